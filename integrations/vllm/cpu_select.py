"""``CPU_ATTN`` on vLLM's CPU platform: this backend with a sparse config, vLLM's own without one.

vLLM resolves a backend's class path (``module.attr``) while it builds the model, when its config is
current; the module-level ``__getattr__`` (PEP 562) answers then, so the choice follows the config of
the running engine rather than the moment the plugin was loaded (which is before any config exists).
"""

from __future__ import annotations


def __getattr__(name: str) -> type:
    if name != "CPU_ATTN":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm.config import get_current_vllm_config_or_none

    from .settings import sparse_config

    if sparse_config(get_current_vllm_config_or_none()) is not None:
        from .backend import SparseCPUAttentionBackend

        return SparseCPUAttentionBackend
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend
