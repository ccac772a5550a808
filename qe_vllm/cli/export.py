"""``qe-export``: write a QuantEase checkpoint in a format stock vLLM serves without the plugin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qe_vllm.converters.export import FORMAT, describe, export_compressed_tensors

EPILOG = """\
example:
  qe-convert --model ./SmolLM2-135M-Instruct --output ./smollm2-w4 --method rtn --bits 4 \\
      --group-size 128 --outlier-fraction 0
  qe-export --model ./smollm2-w4 --output ./smollm2-w4-ct
  VLLM_PLUGINS=none vllm serve ./smollm2-w4-ct     # stock vLLM, quantease plugin not loaded

Only outlier-free 4-bit checkpoints can be exported: compressed-tensors has no sparse
outlier term, and stock vLLM has no kernel for 2/3-bit codes. Others are refused.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qe-export",
        description="Export a QuantEase checkpoint (outlier-free, 4-bit) to compressed-tensors "
        "pack-quantized, which stock vLLM serves with its own int4 kernels.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="QuantEase checkpoint directory")
    p.add_argument("--output", required=True, type=Path, help="directory to create")
    p.add_argument("--format", choices=(FORMAT,), default=FORMAT, help="(default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = export_compressed_tensors(args.model, args.output, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"qe-export: error: {e}", file=sys.stderr)
        return 2
    print(describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
