"""Import hygiene and packaging of the installed ``sparse_attn``.

The import checks run in a fresh interpreter in isolated mode (``python -I``: no PYTHON* variables,
no current directory on sys.path) with a minimal environment, so they see the *installed* package
(the editable install of this working tree under ``make install``) exactly as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sparse_attn

REPO = Path(__file__).resolve().parents[1]

# Top-level folder -> import package it installs as (pyproject.toml [tool.setuptools.package-dir]).
MAPPED_DIRS = {
    "sparse_attn": "sparse_attn",
    "triton_kernels": "sparse_attn.triton_kernels",
    "integrations": "sparse_attn.integrations",
    "bench": "sparse_attn.bench",
}

HEAVY_OPTIONAL = ("triton", "transformers", "vllm")

PUBLIC_NAMES = (
    "sparse_attention",
    "block_sparse_attention",
    "token_sparse_attention",
    "merge_attention",
    "S2",
    "SinkLocal",
    "MoA",
    "BlockSparse",
    "Dense",
    "SparseAttentionConfig",
    "BlockLayout",
    "TokenSelection",
    "fallback_counts",
    "reset_fallback_counts",
)

# error name -> builtin base classes it must also derive from (API.md "Errors")
ERRORS = {
    "SparseAttnError": (Exception,),
    "ShapeError": (ValueError,),
    "DTypeError": (TypeError,),
    "DeviceError": (ValueError,),
    "LayoutError": (ValueError,),
    "ConfigError": (ValueError,),
    "PlanFileError": (ValueError,),
    "DenseFallbackError": (RuntimeError,),
}


def _clean_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    for key in ("HOME", "TMPDIR", "SYSTEMROOT"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _run_isolated(code: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run ``code`` in ``python -I`` from ``tmp_path``; it reports by writing JSON to argv[1]."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(code), str(report)],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"subprocess failed (is the package installed? run `make install`)\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc, json.loads(report.read_text())


def _loaded(modules: list[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in roots)


def test_import_is_silent_lazy_and_side_effect_free(tmp_path: Path) -> None:
    proc, rep = _run_isolated(
        """
        import os, sys
        env_before = dict(os.environ)
        import sparse_attn
        env_after = dict(os.environ)
        import json, torch
        report = {
            "file": sparse_attn.__file__,
            "modules": sorted(sys.modules),
            "cuda_initialized": torch.cuda.is_initialized(),
            "env_changed": sorted(
                k for k in set(env_before) | set(env_after) if env_before.get(k) != env_after.get(k)
            ),
        }
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
        """,
        tmp_path,
    )
    assert proc.stdout == "", f"`import sparse_attn` wrote to stdout:\n{proc.stdout}"
    assert proc.stderr == "", f"`import sparse_attn` wrote to stderr:\n{proc.stderr}"
    assert _loaded(rep["modules"], HEAVY_OPTIONAL) == [], "optional dependencies imported eagerly"
    assert rep["cuda_initialized"] is False, "`import sparse_attn` initialised CUDA"
    assert rep["env_changed"] == [], f"`import sparse_attn` changed os.environ: {rep['env_changed']}"


def test_mapped_subpackages_import_from_the_installed_package(tmp_path: Path) -> None:
    _, rep = _run_isolated(
        """
        import importlib.util, json, sys
        import sparse_attn
        import sparse_attn.triton_kernels, sparse_attn.integrations, sparse_attn.bench
        import sparse_attn.integrations.vllm, sparse_attn.integrations.vllm.step
        import sparse_attn.integrations.vllm.settings, sparse_attn.integrations.vllm.cache
        spec = importlib.util.find_spec("triton_kernels")
        report = {
            "sparse_attn": sparse_attn.__file__,
            "sub": {
                name: sys.modules[name].__file__
                for name in ("sparse_attn.triton_kernels", "sparse_attn.integrations", "sparse_attn.bench")
            },
            "top_triton_kernels": None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or []))),
            "modules": sorted(sys.modules),
        }
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
        """,
        tmp_path,
    )
    pkg_dir = Path(rep["sparse_attn"]).resolve().parent
    editable = pkg_dir == REPO / "sparse_attn"
    for folder, name in MAPPED_DIRS.items():
        if name == "sparse_attn":
            continue
        origin = Path(rep["sub"][name]).resolve()
        # editable install: the working-tree folder; wheel install: inside the sparse_attn package
        expected = (REPO / folder if editable else pkg_dir / name.split(".")[1]) / "__init__.py"
        assert origin == expected, f"{name} resolved to {origin}, expected {expected}"

    # no top-level `triton_kernels` of ours (a PyPI package of that name exists and vLLM imports it)
    top = rep["top_triton_kernels"]
    if top is not None:
        assert str(REPO / "triton_kernels") not in top and str(pkg_dir) not in top, (
            f"`import triton_kernels` resolves to this project: {top}"
        )

    assert _loaded(rep["modules"], ("transformers", "vllm")) == [], (
        "importing the subpackages imported transformers/vllm eagerly"
    )


def test_distribution_metadata(tmp_path: Path) -> None:
    # in the isolated interpreter: from the repo root, metadata would also find a stray
    # sparse_attn.egg-info of the working tree instead of the installed distribution
    _, rep = _run_isolated(
        """
        import json, sys
        from importlib import metadata
        dist = metadata.distribution("sparse-attn")
        report = {
            "version": dist.version,
            "scripts": {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"},
            "vllm_plugins": {ep.name: ep.value for ep in dist.entry_points if ep.group == "vllm.general_plugins"},
            "files": [str(f) for f in dist.files or ()],
            "top_level": (dist.read_text("top_level.txt") or "").split(),
        }
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
        """,
        tmp_path,
    )
    assert rep["version"] == "0.1.0"
    assert rep["scripts"].get("sparse-attn") == "sparse_attn.cli:main"
    assert rep["vllm_plugins"] == {"sparse_attn": "sparse_attn.integrations.vllm:register"}
    assert rep["top_level"] in ([], ["sparse_attn"]), f"top-level import packages: {rep['top_level']}"
    # nothing installed at top level except the sparse_attn package (and editable-install helpers)
    stray = sorted({Path(f).parts[0] for f in rep["files"]} & (set(MAPPED_DIRS) - {"sparse_attn"}))
    assert stray == [], f"installed as top-level packages: {stray}"


def test_pyproject_lists_every_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {v: k for k, v in MAPPED_DIRS.items()}
    listed = set(cfg["packages"])
    on_disk = set()
    for folder, name in MAPPED_DIRS.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            on_disk.add(".".join((name, *rel)))
    missing = sorted(on_disk - listed)
    assert missing == [], f"packages on disk but not in pyproject.toml [tool.setuptools] packages: {missing}"
    absent = sorted(listed - on_disk)
    assert absent == [], f"packages listed in pyproject.toml with no __init__.py on disk: {absent}"
    assert "triton_kernels" not in listed


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_exists(name: str) -> None:
    assert hasattr(sparse_attn, name), f"sparse_attn.{name} is missing"


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_classes(name: str) -> None:
    cls = getattr(sparse_attn, name)
    assert issubclass(cls, sparse_attn.SparseAttnError)
    for base in ERRORS[name]:
        assert issubclass(cls, base), f"{name} must subclass {base.__name__}"
    from sparse_attn import errors

    assert getattr(errors, name) is cls


def test_plan_file_error_is_config_error_and_coverage_warning() -> None:
    assert issubclass(sparse_attn.PlanFileError, sparse_attn.ConfigError)
    assert issubclass(sparse_attn.CoverageWarning, UserWarning)


def test_documented_submodules() -> None:
    from sparse_attn.methods import method_from_dict
    from sparse_attn.reference import reference_attention

    assert callable(method_from_dict) and callable(reference_attention)
