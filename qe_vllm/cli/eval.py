"""``qe-eval``: perplexity of an original or a QuantEase checkpoint (GPTQ protocol).

The text is taken as given, tokenized without special tokens and cut into
non-overlapping windows of ``--seqlen`` tokens; ``ppl = exp(mean NLL)`` over all
predicted tokens. A QuantEase checkpoint is evaluated from its packed tensors on
disk (``qe_vllm.converters.hf_loading``), not from a dense copy.

With ``--server URL`` nothing is loaded locally: each window is sent as token ids to
the server's OpenAI ``/v1/completions`` endpoint with ``echo``, ``logprobs`` and
``max_tokens=0``, and the returned prompt logprobs are scored the same way. That
measures the model exactly as it is served (vLLM's kernels, dtype, and plugin).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from qe_vllm.converters.calibration import load_text, tokenize
from qe_vllm.converters.hf_loading import is_quantease_checkpoint, load_model, resolve_model
from qe_vllm.converters.pipeline import pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EPILOG = """\
examples:
  qe-eval --model ./SmolLM2-135M-Instruct --data wiki.test.raw.txt --windows 4
  qe-eval --model ./smollm2-w4 --data wiki.test.raw.txt --windows 16 --output ppl.json

  # through a running server (started with --max-model-len >= seqlen + 1)
  qe-eval --server http://127.0.0.1:8000 --model ./smollm2-w4 --data wiki.test.raw.txt
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qe-eval",
        description="Perplexity of a Hugging Face causal LM or a QuantEase checkpoint on a text "
        "(non-overlapping windows, GPTQ protocol).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a(
        "--model",
        required=True,
        help="model directory (original or converted by qe-convert), or a cached hub id",
    )
    a(
        "--data",
        required=True,
        help="evaluation text: a .txt file (used as given), .json/.jsonl/.parquet, "
        "a directory of .txt files, or a datasets name NAME[:CONFIG][@SPLIT]",
    )
    a("--seqlen", type=int, default=2048, help="tokens per window (default %(default)s)")
    a("--windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    a(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="compute dtype (default %(default)s)",
    )
    a("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default %(default)s)")
    a(
        "--server",
        help="score through this OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of "
        "loading the model; --model is then the served model name, --dtype/--device are unused",
    )
    a(
        "--tokenizer",
        help="with --server: tokenizer directory or hub id (default: --model, which vLLM uses as "
        "the served name unless --served-model-name was given)",
    )
    a("--output", type=Path, help="also write the result as JSON to this file")
    return p


@torch.no_grad()
def perplexity(
    model, tokens: torch.Tensor, seqlen: int, windows: int, device: torch.device
) -> tuple[float, int]:
    """``(ppl, scored tokens)`` over the first ``windows`` non-overlapping windows of ``tokens``."""
    nll, count = 0.0, 0
    for i in range(windows):
        ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += seqlen - 1
    return math.exp(nll / count), count


def server_perplexity(
    url: str, model: str, tokens: torch.Tensor, seqlen: int, windows: int, timeout: float = 600.0
) -> tuple[float, int]:
    """:func:`perplexity` through ``url``'s ``/v1/completions`` prompt logprobs.

    Each window goes as a list of token ids (no re-tokenization, no BOS added) with
    ``echo=True, logprobs=0, max_tokens=0``; the server returns the log-probability of
    every prompt token after the first, which is exactly what :func:`perplexity` scores.
    """
    nll, count = 0.0, 0
    for i in range(windows):
        ids = tokens[i * seqlen : (i + 1) * seqlen].tolist()
        payload = {"model": model, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0,
                   "temperature": 0.0}
        req = urllib.request.Request(
            url.rstrip("/") + "/v1/completions", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ValueError(f"server answered {e.code}: {e.read().decode(errors='replace')[:300]}") from None
        logprobs = body["choices"][0]["logprobs"]["token_logprobs"]
        if len(logprobs) != seqlen or any(lp is None for lp in logprobs[1:]):
            raise ValueError(
                f"server returned {len(logprobs)} prompt logprobs for a {seqlen}-token window; "
                "does it serve this model with --max-model-len >= seqlen?"
            )
        nll -= sum(logprobs[1:])
        count += seqlen - 1
    return math.exp(nll / count), count


def evaluate(
    model_name: str, data: str, seqlen: int, windows: int | None, dtype: str, device: str,
    server: str | None = None, tokenizer: str | None = None,
) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    if server is not None:
        tok_path = resolve_model(tokenizer or model_name)
        tokens = tokenize(AutoTokenizer.from_pretrained(tok_path), load_text(data))
        n = _window_count(tokens, data, seqlen, windows)
        ppl, scored = server_perplexity(server, model_name, tokens, seqlen, n)
        return {
            "model": model_name,
            "server": server,
            "tokenizer": str(tok_path),
            "data": data,
            "seqlen": seqlen,
            "windows": n,
            "tokens_scored": scored,
            "ppl": ppl,
            "seconds": round(time.perf_counter() - start, 2),
        }
    path = resolve_model(model_name)
    dev = pick_device(device)
    tokens = tokenize(AutoTokenizer.from_pretrained(path), load_text(data))
    n = _window_count(tokens, data, seqlen, windows)
    model = load_model(path, DTYPES[dtype], dev)
    ppl, scored = perplexity(model, tokens, seqlen, n, dev)
    return {
        "model": str(path),
        "quantized": is_quantease_checkpoint(path),
        "data": data,
        "seqlen": seqlen,
        "windows": n,
        "tokens_scored": scored,
        "ppl": ppl,
        "dtype": dtype,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _window_count(tokens: torch.Tensor, data: str, seqlen: int, windows: int | None) -> int:
    available = tokens.numel() // seqlen
    if available == 0:
        raise ValueError(
            f"{data} has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    n = available if windows is None else min(windows, available)
    if n < 1:
        raise ValueError(f"--windows must be at least 1, got {windows}")
    return n


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own progress and one-line errors
    try:
        result = evaluate(
            args.model, args.data, args.seqlen, args.windows, args.dtype, args.device,
            server=args.server, tokenizer=args.tokenizer,
        )
    except (ValueError, OSError) as e:
        print(f"qe-eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    if "server" in result:
        source = f"served by {result['server']}"
    else:
        source = f"{'quantease' if result['quantized'] else 'original'} model"
    print(
        f"perplexity {result['ppl']:.4f} ({result['windows']} x {result['seqlen']} tokens, "
        f"{source}, {result['seconds']} s)"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
