"""Tiny random transformers models, built from configs (no downloads), one per supported architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

VOCAB = 101


@dataclass(frozen=True)
class Arch:
    name: str
    causal: bool = True
    window: int | None = None  # the model's sliding window, when the tiny config sets one


ARCHS = (
    Arch("llama"),
    Arch("qwen2"),
    Arch("qwen3"),
    Arch("mistral", window=24),
    Arch("gemma"),
    Arch("phi3"),
    Arch("gpt_neox"),
    Arch("bert", causal=False),
)
DECODERS = tuple(a for a in ARCHS if a.causal)


def build(
    arch: str,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A randomly initialised model of ``arch`` in eval mode, attn_implementation="sdpa"."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    gqa = dict(num_key_value_heads=num_kv_heads)
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common, **gqa), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common, **gqa), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, **gqa, head_dim=head_dim), tf.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(**common, **gqa, head_dim=head_dim, sliding_window=24), tf.MistralForCausalLM
    elif arch == "gemma":
        cfg, cls = tf.GemmaConfig(**common, **gqa, head_dim=head_dim), tf.GemmaForCausalLM
    elif arch == "phi3":
        cfg = tf.Phi3Config(**common, **gqa, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cls = tf.Phi3ForCausalLM
    elif arch == "gpt_neox":
        cfg, cls = tf.GPTNeoXConfig(**common), tf.GPTNeoXForCausalLM
    elif arch == "bert":
        cfg, cls = tf.BertConfig(**common), tf.BertModel
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    return cls(cfg).to(dtype).eval()


def inputs(arch: Arch, batch: int, length: int, pads: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [batch, length] and the attention mask with ``pads[b]`` padding tokens per row:
    on the left for decoders (as for generation), on the right for encoders (as tokenizers pad)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        if p:
            if arch.causal:
                mask[b, :p] = 0
            else:
                mask[b, length - p :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids the way generate() derives them from a left-padded mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def outputs(model: Any, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Logits of a causal LM, last hidden state of an encoder."""
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def loki_basis(arch: str, path: Any, tokens: int = 192, seed: int = 0, **build_kwargs: Any) -> str:
    """Calibrate a Loki basis for ``build(arch, **build_kwargs)`` on random token ids; returns the
    artifact path (without suffix)."""
    from sparse_attn.calibration import calibrate_loki

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (tokens,), generator=g).tolist()
    calibrate_loki(build(arch, **build_kwargs), [ids], seq_len=64, out=path, command=f"tests: loki_basis({arch!r})")
    return str(path)
