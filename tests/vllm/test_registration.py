"""The plugin against the real vLLM package: entry point, registration, CPU_ATTN resolution, versions."""

from __future__ import annotations

import logging

import pytest
import vllm
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from sparse_attn.integrations import vllm as plugin
from sparse_attn.integrations.vllm import cpu_select
from sparse_attn.integrations.vllm.backend import SparseAttentionBackend, SparseCPUAttentionBackend


def test_entry_point_is_declared() -> None:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "sparse_attn"]
    assert [ep.value for ep in found] == ["sparse_attn.integrations.vllm:register"]


def test_load_general_plugins_registers_custom() -> None:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    assert AttentionBackendEnum.CUSTOM.get_class() is SparseAttentionBackend
    assert AttentionBackendEnum.CPU_ATTN.get_path() == plugin.CPU_BACKEND_PATH
    plugin.register()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_class() is SparseAttentionBackend


def test_cpu_attn_resolves_by_config(monkeypatch) -> None:
    """Without a sparse config vLLM keeps its own CPU backend class; with one it gets ours."""
    monkeypatch.delenv("SPARSE_ATTN_CONFIG", raising=False)
    assert cpu_select.CPU_ATTN is CPUAttentionBackend
    monkeypatch.setenv("SPARSE_ATTN_CONFIG", "sink_local")
    assert cpu_select.CPU_ATTN is SparseCPUAttentionBackend
    assert SparseCPUAttentionBackend.get_name() == "CPU_ATTN"
    assert SparseAttentionBackend.get_name() == "CUSTOM"
    with pytest.raises(AttributeError):
        _ = cpu_select.NOT_A_BACKEND


def test_backend_capabilities() -> None:
    b = SparseAttentionBackend
    assert b.supports_head_size(64) and b.supports_head_size(96) and not b.supports_head_size(512)
    assert b.supports_attn_type("decoder") and not b.supports_attn_type("encoder_only")
    assert b.supports_block_size(16) and b.supports_block_size(128) and not b.supports_block_size(8)
    assert not b.supports_kv_cache_dtype("fp8")


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.33.1"])
def test_supported_versions(version: str) -> None:
    assert str(plugin.check_vllm_version(version)) == version


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "dev"])
def test_unsupported_versions(version: str) -> None:
    with pytest.raises(plugin.UnsupportedVLLMError, match=r"vllm|version"):
        plugin.check_vllm_version(version)


def test_installed_vllm_is_supported() -> None:
    assert plugin.check_vllm_version().release[:2] == (0, 32)


def test_register_on_unsupported_vllm(monkeypatch, caplog) -> None:
    """Stays out of the way (warning, nothing registered) unless sparse attention was asked for."""
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv("SPARSE_ATTN_CONFIG", raising=False)
    with caplog.at_level(logging.WARNING, logger="sparse_attn.vllm"):
        plugin.register()
    assert "not registered" in caplog.text
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv("SPARSE_ATTN_CONFIG", "sink_local")
    with pytest.raises(plugin.UnsupportedVLLMError, match=r"0\.31\.0"):
        plugin.register()
