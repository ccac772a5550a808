"""Greedy generation with vLLM in a fresh process; writes tokens and logprobs as JSON.

Tests run this as a subprocess so every model gets a clean vLLM (engine
processes, plugin registration, torch.compile state) and nothing leaks between
tests. Usage: ``python tests/helpers/vllm_generate.py MODEL OUT.json [--tp N]
[--mode eager|compile|dynamo] [--quantization NAME] [--max-tokens N] [--dtype D]``.
Each result also holds ``margins`` (per generated token, the gap between the best and
second-best logprob: where greedy decoding had a near-tie) and ``prompt_logprobs``: the
log-probability of every prompt token after the first (teacher-forced, so comparable
even where greedy outputs diverge).
"""

from __future__ import annotations

import argparse
import json
import os

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colors are",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters.",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--mode", choices=["eager", "compile", "dynamo"], default="eager")
    p.add_argument("--quantization", default=None)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.tp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(args.tp))
    if args.mode == "dynamo":  # fullgraph Dynamo trace with the eager backend: no C++ build
        os.environ["VLLM_CPU_CI_ENV"] = "1"
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=256,
        tensor_parallel_size=args.tp,
        enforce_eager=args.mode == "eager",
        quantization=args.quantization,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, logprobs=2, prompt_logprobs=0
    )
    results = []
    for out in llm.generate(PROMPTS, params):
        o = out.outputs[0]
        chosen = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]
        top2 = [sorted((v.logprob for v in lp.values()), reverse=True)[:2] for lp in o.logprobs]
        prompt = [lp[t].logprob for t, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
        results.append({
            "text": o.text, "token_ids": list(o.token_ids), "logprobs": chosen,
            "margins": [a - b for a, b in top2],
            "prompt_token_ids": list(out.prompt_token_ids), "prompt_logprobs": prompt,
        })
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
