"""Calibration artifacts: safetensors + JSON sidecar round trip, checked against the model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sparse_attn.artifact import ModelShape, load_artifact, load_cached, save_artifact
from sparse_attn.errors import ConfigError, PlanFileError

SHAPE = ModelShape("llama", 3, 6, 2, 16)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"basis": torch.randn(3, 2, 16, 16, generator=g), "mean": torch.randn(3, 2, 16, generator=g)}


def test_round_trip_keeps_tensors_model_and_command(tmp_path):
    tensors = _tensors()
    st = save_artifact(tmp_path / "a", "loki", tensors, SHAPE, "sparse-attn calibrate loki", {"rank": 4})
    assert st.suffix == ".safetensors" and st.with_suffix(".json").is_file()
    sidecar = json.loads(st.with_suffix(".json").read_text())
    assert sidecar["command"] == "sparse-attn calibrate loki"
    assert sidecar["tensors"]["basis"] == [3, 2, 16, 16]
    for path in (tmp_path / "a", st, st.with_suffix(".json")):
        art = load_artifact(path, "loki", expect=SHAPE)
        assert art.model == SHAPE and art.meta == {"rank": 4}
        for name, t in tensors.items():
            assert torch.equal(art.tensors[name], t)


@pytest.mark.parametrize(
    "other",
    [
        ModelShape("llama", 4, 6, 2, 16),
        ModelShape("llama", 3, 8, 2, 16),
        ModelShape("llama", 3, 6, 3, 16),
        ModelShape("llama", 3, 6, 2, 32),
        ModelShape("qwen2", 3, 6, 2, 16),
    ],
)
def test_artifact_for_another_model_is_refused_naming_both(tmp_path, other):
    save_artifact(tmp_path / "a", "loki", _tensors(), SHAPE, "cmd")
    with pytest.raises(PlanFileError) as err:
        load_artifact(tmp_path / "a", "loki", expect=other)
    assert SHAPE.describe() in str(err.value) and other.describe() in str(err.value)
    assert isinstance(err.value, ConfigError)


def test_wrong_kind_missing_and_malformed_files(tmp_path):
    save_artifact(tmp_path / "a", "loki", _tensors(), SHAPE, "cmd")
    with pytest.raises(PlanFileError, match="'loki' artifact, expected 'magicpig'"):
        load_artifact(tmp_path / "a", "magicpig")
    with pytest.raises(PlanFileError, match=r"not found: .*missing\.safetensors"):
        load_artifact(tmp_path / "missing", "loki")
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(PlanFileError, match="not a sparse_attn artifact"):
        load_artifact(tmp_path / "a", "loki")
    save_artifact(tmp_path / "b", "loki", _tensors(), SHAPE, "cmd")
    (tmp_path / "b.safetensors").write_bytes(b"garbage")
    with pytest.raises(PlanFileError, match="cannot read"):
        load_artifact(tmp_path / "b", "loki")


def test_model_shape_from_hf_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2
    )
    assert ModelShape.from_hf_config(cfg) == ModelShape("llama", 3, 6, 2, 16)


def test_load_cached_reads_a_file_once_per_version_and_checks_each_read(tmp_path):
    checked = []
    st = save_artifact(tmp_path / "a", "loki", _tensors(), SHAPE, "cmd")
    first = load_cached(str(tmp_path / "a"), {}, "loki", checked.append)
    assert load_cached(st, {}, "loki", checked.append) is first  # same file, either spelling
    assert checked == [first]
    # a newer version of the file (a re-run calibration) is read again
    tensors = {name: t + 1 for name, t in _tensors().items()}
    save_artifact(tmp_path / "a", "loki", tensors, SHAPE, "cmd")
    later = st.stat().st_mtime_ns + 10**9
    os.utime(st, ns=(later, later))
    second = load_cached(st, {}, "loki", checked.append)
    assert second is not first and checked == [first, second]
    assert torch.equal(second.tensors["basis"], tensors["basis"])
    # a shipped name resolves inside the package; a missing file names its path
    shipped = load_cached("smollm2", {"smollm2": "loki_smollm2"}, "loki")
    assert shipped.path.parent.name == "data" and shipped.model.num_layers == 30
    missing = tmp_path / "gone"
    with pytest.raises(PlanFileError, match=str(missing)):
        load_cached(missing, {}, "loki")
    # a check that refuses the tensors raises, and nothing is cached
    def refuse(art):
        raise PlanFileError(f"{art.path}: no")

    other = save_artifact(tmp_path / "b", "loki", _tensors(), SHAPE, "cmd")
    for _ in range(2):
        with pytest.raises(PlanFileError, match="no"):
            load_cached(other, {}, "loki", refuse)
