"""Greedy generation with vLLM; writes tokens and logprobs as JSON.

Two ways to run it (both as a subprocess of the tests, never inside pytest itself):

* one job: ``python tests/helpers/vllm_generate.py MODEL OUT.json [--tp N]
  [--mode eager|compile|dynamo] [--quantization NAME] [--max-tokens N] [--dtype D]``,
  the way a user's process starts vLLM (tests of start-up refusals use this);
* ``--worker FD``: a long-lived process that reads one job per line (JSON) on stdin and
  answers each on file descriptor ``FD``. Its engines run in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so after the first job a generation costs an
  engine start (seconds), not two Python processes importing vLLM (a minute on 2 CPU
  cores). Between jobs it shuts the engine down and resets what vLLM and Dynamo keep per
  process (``cleanup_dist_env_and_memory``, which also drops vLLM's cache of environment
  variables, so a job's ``env`` takes effect).

Each result also holds ``margins`` (per generated token, the gap between the best and
second-best logprob: where greedy decoding had a near-tie) and ``prompt_logprobs``: the
log-probability of every prompt token after the first (teacher-forced, so comparable
even where greedy outputs diverge).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback

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
DEFAULTS = {"tp": 1, "mode": "eager", "quantization": None, "max_tokens": 12, "dtype": "bfloat16"}


def job_env(job: dict) -> dict[str, str]:
    """The environment variables a job needs on top of the process's own."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    if job["tp"] > 1:  # the ranks share the cores this process may use (tests/conftest.py pins it)
        cores = sorted(os.sched_getaffinity(0))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cores[i % len(cores)]) for i in range(job["tp"]))
    if job["mode"] == "dynamo":  # fullgraph Dynamo trace with the eager backend: no C++ build
        env["VLLM_CPU_CI_ENV"] = "1"
    return {**env, **job.get("env", {})}


def generate(job: dict) -> None:
    """Run one job (``DEFAULTS`` plus ``model`` and ``out``) and write its results to ``out``."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_model_len=256,
        tensor_parallel_size=job["tp"],
        enforce_eager=job["mode"] == "eager",
        quantization=job["quantization"],
    )
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=job["max_tokens"], logprobs=2, prompt_logprobs=0
        )
        results = []
        for out in llm.generate(PROMPTS, params, use_tqdm=False):
            o = out.outputs[0]
            chosen = [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]
            top2 = [sorted((v.logprob for v in lp.values()), reverse=True)[:2] for lp in o.logprobs]
            prompt = [lp[t].logprob for t, lp in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
            results.append({
                "text": o.text, "token_ids": list(o.token_ids), "logprobs": chosen,
                "margins": [a - b for a, b in top2],
                "prompt_token_ids": list(out.prompt_token_ids), "prompt_logprobs": prompt,
            })
        with open(job["out"], "w") as f:
            json.dump(results, f)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def reset_process() -> None:
    """Forget the last engine: distributed groups, vLLM's env cache, Dynamo's compiled code."""
    import torch
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    torch._dynamo.reset()
    gc.collect()


def serve_jobs(reply_fd: int) -> None:
    """Answer jobs from stdin until it closes; one JSON line per job on ``reply_fd``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with os.fdopen(reply_fd, "w") as reply:
        for line in sys.stdin:
            job = {**DEFAULTS, **json.loads(line)}
            env = job_env(job)
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                generate(job)
                answer = {"ok": True}
            except Exception:
                answer = {"ok": False, "error": traceback.format_exc()[-4000:]}
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                reset_process()
            reply.write(json.dumps(answer) + "\n")
            reply.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--worker", type=int, metavar="FD", help="serve jobs from stdin, answer on FD")
    p.add_argument("--tp", type=int, default=DEFAULTS["tp"])
    p.add_argument("--mode", choices=["eager", "compile", "dynamo"], default=DEFAULTS["mode"])
    p.add_argument("--quantization", default=DEFAULTS["quantization"])
    p.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"])
    p.add_argument("--dtype", default=DEFAULTS["dtype"])
    args = p.parse_args()
    if args.worker is not None:
        serve_jobs(args.worker)
        return
    job = {k: v for k, v in vars(args).items() if k != "worker"}
    os.environ.update(job_env(job))
    generate(job)


if __name__ == "__main__":
    main()
