"""Benchmarks for sparse_attn (installed as ``sparse_attn.bench``).

- ``throughput``: CPU prefill/decode throughput of the static patterns against dense SDPA (and
  FlexAttention when it runs on CPU); run it with ``sparse-attn bench throughput``.
- ``harness``: timing (warmup, then repeated runs; p20/p50/p80 in ms) and the environment record
  written into every result file.
- ``memory``: peak extra resident memory of a callable (Linux).

Nothing here runs at import; the CLI imports these modules only inside the ``bench`` command.
"""
