"""``qe-eval``: perplexity of an original or a QuantEase checkpoint (GPTQ protocol).

The text is taken as given, tokenized without special tokens and cut into
non-overlapping windows of ``--seqlen`` tokens; ``ppl = exp(mean NLL)`` over all
predicted tokens. A QuantEase checkpoint is evaluated from its packed tensors on
disk (``qe_vllm.converters.hf_loading``), not from a dense copy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from qe_vllm.converters.calibration import load_text, tokenize
from qe_vllm.converters.hf_loading import is_quantease_checkpoint, load_model, resolve_model
from qe_vllm.converters.pipeline import pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EPILOG = """\
examples:
  qe-eval --model ./SmolLM2-135M-Instruct --data ../shared/data/wikitext-2-raw-test.txt --windows 4
  qe-eval --model ./smollm2-w4 --data ../shared/data/wikitext-2-raw-test.txt --windows 16 --output ppl.json
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


def evaluate(
    model_name: str, data: str, seqlen: int, windows: int | None, dtype: str, device: str
) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    path = resolve_model(model_name)
    dev = pick_device(device)
    tokens = tokenize(AutoTokenizer.from_pretrained(path), load_text(data))
    available = tokens.numel() // seqlen
    if available == 0:
        raise ValueError(
            f"{data} has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    n = available if windows is None else min(windows, available)
    if n < 1:
        raise ValueError(f"--windows must be at least 1, got {windows}")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own progress and one-line errors
    try:
        result = evaluate(args.model, args.data, args.seqlen, args.windows, args.dtype, args.device)
    except (ValueError, OSError) as e:
        print(f"qe-eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(
        f"perplexity {result['ppl']:.4f} ({result['windows']} x {result['seqlen']} tokens, "
        f"{'quantease' if result['quantized'] else 'original'} model, {result['seconds']} s)"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
