"""Run one vLLM engine in this process and print its greedy tokens as JSON (used by the tests as a
subprocess: vLLM caches its backend choice per process, so every configuration gets a fresh one).

argv[1]: JSON {"model": dir, "prompts": [[ids]], "max_tokens": n, "dtype": str, "sparse_attn": spec | null,
"attention_backend": name, "max_num_batched_tokens": n, "max_model_len": n, "rounds": [[prompt index]],
"enable_prefix_caching": bool, "block_size": n, "tensor_parallel_size": n}.
``rounds`` (default: one round of every prompt) are ``generate`` calls made one after the other on the
same engine, so a later round can hit pages an earlier one cached. Prints one line
``RESULT {"tokens": [[[ids] per prompt of the round] per round], "stats": ...}`` (``tokens`` is the
flat list of the single round when ``rounds`` is not given).
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
    if spec.get("block_size"):
        extra["block_size"] = spec["block_size"]
    tp = spec.get("tensor_parallel_size", 1)
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        dtype=spec.get("dtype", "float32"),
        max_model_len=spec.get("max_model_len", 512),
        max_num_seqs=len(spec["prompts"]),
        enable_chunked_prefill=True,
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 64),
        enable_prefix_caching=spec.get("enable_prefix_caching", True),
        enforce_eager=True,
        tensor_parallel_size=tp,
        # TP workers are processes; one engine alone stays in this process
        distributed_executor_backend="mp" if tp > 1 else "uni",
        seed=0,
        **extra,
    )
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, detokenize=False)
    prompts = spec["prompts"]
    rounds = spec.get("rounds") or [list(range(len(prompts)))]
    tokens = []
    for chosen in rounds:
        batch = [TokensPrompt(prompt_token_ids=prompts[i]) for i in chosen]
        outputs = llm.generate(batch, params, use_tqdm=False)
        tokens.append([list(o.outputs[0].token_ids) for o in outputs])
    backend_module = sys.modules.get("sparse_attn.integrations.vllm.backend")
    result = {
        "tokens": tokens if "rounds" in spec else tokens[0],
        "stats": None if backend_module is None else backend_module.stats(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
