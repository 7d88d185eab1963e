"""Run one vLLM engine in this process and print its greedy tokens as JSON (used by the tests as a
subprocess: vLLM caches its backend choice per process, so every configuration gets a fresh one).

argv[1]: JSON {"model": dir, "prompts": [[ids]], "max_tokens": n, "dtype": str, "sparse_attn": spec | null, "attention_backend": name,
"max_num_batched_tokens": n, "max_model_len": n}. Prints one line ``RESULT {"tokens": [[ids]], "stats": ...}``.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {} if spec.get("sparse_attn") is None else {"additional_config": {"sparse_attn": spec["sparse_attn"]}}
    if spec.get("attention_backend"):
        extra["attention_backend"] = spec["attention_backend"]
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 512),
        max_num_seqs=len(spec["prompts"]),
        enable_chunked_prefill=True,
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 64),
        enforce_eager=True,
        distributed_executor_backend="uni",
        seed=0,
        **extra,
    )
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    backend_module = sys.modules.get("sparse_attn.integrations.vllm.backend")
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "stats": None if backend_module is None else backend_module.stats(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
