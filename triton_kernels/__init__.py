"""GPU Triton kernels for sparse_attn (installed as ``sparse_attn.triton_kernels``).

The core imports these modules lazily, only when a CUDA tensor (or ``TRITON_INTERPRET=1``) asks for
them, so ``import sparse_attn`` never imports triton. This package imports nothing else of the
project: plain tensors and ints in, tensors out.
"""
