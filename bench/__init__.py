"""Benchmarks for sparse_attn (installed as ``sparse_attn.bench``).

- the throughput benchmark, one harness for CPU and GPU: ``runner`` (runs a suite of rows on a
  device), ``cases`` (the method configs timed), ``checks`` (the correctness gate before timing),
  ``schema`` (the result document, the same on every device, and the reading of older ones),
  ``goals``, ``table`` (text and markdown tables); ``throughput`` is the CPU suite (``sparse-attn
  bench throughput``) and ``kernels`` the GPU suite with the Triton kernels (``sparse-attn bench
  kernels``).
- ``harness``: timers (wall clock or CUDA events: warmup, then repeated runs; p20/p50/p80 in ms),
  the ``Device`` a benchmark runs on, and the environment record written into every result file.
- ``memory``: peak extra memory of a callable (RSS on Linux, the CUDA allocator on GPU).
- ``accuracy`` (+ ``accuracy_report``, ``prompts``, ``scoring``, ``perplexity``, ``generation``,
  ``plots``): long-context accuracy of each method against dense on a causal LM — passkey grid,
  multi-key retrieval, perplexity by position; ``sparse-attn bench accuracy``.
- ``model_throughput``: full-model prefill time and decode ms/token per method, behind a
  correctness self-check; ``demo``: the compact accuracy + speed comparison of ``sparse-attn demo``.
- ``smollm2`` / ``passkey``: the embedded SmolLM2-135M loader and the passkey text.

Nothing here runs at import; the CLI imports these modules only inside the ``bench`` command.
"""
