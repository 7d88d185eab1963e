"""PyTorch (CPU and any device) kernels over the two sparse formats; they gather only selected keys."""

from .block_prefill import block_sparse_attention_torch
from .token_decode import token_sparse_attention_torch

__all__ = ["block_sparse_attention_torch", "token_sparse_attention_torch"]
