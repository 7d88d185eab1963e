"""Benchmarks for sparse_attn (installed as ``sparse_attn.bench``).

- ``throughput``: CPU prefill/decode throughput of the static patterns against dense SDPA (and
  FlexAttention when it runs on CPU); run it with ``sparse-attn bench throughput``.
- ``harness``: timing (warmup, then repeated runs; p20/p50/p80 in ms) and the environment record
  written into every result file.
- ``memory``: peak extra resident memory of a callable (Linux).
- ``accuracy`` (+ ``accuracy_report``, ``prompts``, ``scoring``, ``perplexity``, ``generation``,
  ``plots``): long-context accuracy of each method against dense on a causal LM — passkey grid,
  multi-key retrieval, perplexity by position; ``sparse-attn bench accuracy``.
- ``model_throughput``: full-model prefill time and decode ms/token per method, behind a
  correctness self-check; ``demo``: the compact accuracy + speed comparison of ``sparse-attn demo``.
- ``smollm2`` / ``passkey``: the embedded SmolLM2-135M loader and the passkey text.

Nothing here runs at import; the CLI imports these modules only inside the ``bench`` command.
"""
