"""``qe-convert``: quantize a Hugging Face causal LM into a QuantEase checkpoint that vLLM serves."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import Field, fields
from pathlib import Path

from qe_vllm.converters import distributed
from qe_vllm.converters.checkpoint import MAX_SHARD_BYTES
from qe_vllm.converters.options import ConvertOptions, flag
from qe_vllm.converters.pipeline import ConvertReport, convert
from qe_vllm.format import ROW_PTR, QuantEaseConfig, expected_tensors, linear_nbytes

EPILOG = """\
examples:
  # QuantEase (the default method), 4 bits, groups of 128, calibrated on the corpus bundled
  # with the package: no network and no text of your own needed
  qe-convert --model ./SmolLM2-135M-Instruct --output ./smollm2-w4-qe

  # 3 bits with 1% of the weights kept as float16 outliers, on 128 random 2048-token
  # windows of your own text (a .txt file, a directory of them, or .json/.jsonl/.parquet)
  qe-convert --model ./SmolLM2-135M-Instruct --output ./smollm2-w3-qe --bits 3 \\
      --outlier-fraction 0.01 --calib-data ./my-text-dir --nsamples 128 --seqlen 2048 --device cuda

  # an instruct model calibrated on conversations rendered with its chat template (online)
  qe-convert --model ./SmolLM2-135M-Instruct --output ./smollm2-w4-chat \\
      --calib-data ultrachat --calib-format chat

  # round-to-nearest: no calibration at all (the fastest, least accurate)
  qe-convert --model ./SmolLM2-135M-Instruct --output ./smollm2-w4-rtn --method rtn

  # continue a run that was interrupted (same arguments plus --resume)
  qe-convert ... --resume

  # on 4 processes (GPUs, or CPU cores with gloo): the calibration windows are split between
  # them and the solves spread across them; the checkpoint has the same bytes as on one
  torchrun --nproc-per-node 4 -m qe_vllm.cli.convert --model ./SmolLM2-135M-Instruct --output ./smollm2-w4-qe

then serve it:  vllm serve ./smollm2-w4-qe   (the quantease plugin is picked up automatically)

The output directory is written atomically: it appears only when complete. An
interrupted run leaves a hidden .NAME.partial directory next to it, which
--resume continues and --overwrite discards.
"""

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qe-convert",
        description="Quantize the linear layers of a Hugging Face causal LM to 2/3/4/8-bit integer codes "
        "with per-group scales and sparse float16 outliers, and write a checkpoint vLLM loads "
        "with the quantease method.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--model", required=True, help="local model directory, or a hub id already in the Hugging Face cache")
    a(
        "--output",
        required=True,
        type=Path,
        help="directory to create (refused if it exists, unless --overwrite)",
    )
    for f in fields(ConvertOptions):
        _add_option(p, f)
    a(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where blocks are solved (default %(default)s)",
    )
    a(
        "--max-shard-size",
        type=shard_size,
        default=MAX_SHARD_BYTES,
        metavar="SIZE",
        help="largest output safetensors file, e.g. 500MB or 2GiB; more than one file gets a "
        "model.safetensors.index.json (default 2GiB). The converter holds one file's tensors at a time",
    )
    a("--resume", action="store_true", help="continue an interrupted conversion into the same --output")
    a(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others before it gives up; must exceed "
        "the longest solve of one linear layer (default %(default)s)",
    )
    a(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (and discard an interrupted run)",
    )
    return p


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_size(text: str) -> int:
    """``"500MB"``, ``"2GiB"`` or a byte count, as Hugging Face's ``max_shard_size`` reads them."""
    number = text.strip().upper().rstrip("BIGKM ")
    unit = text.strip().upper()[len(number):].strip()
    try:
        nbytes = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB, 2GB or 2GiB") from None
    if nbytes <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard size must be positive")
    return nbytes


def _add_option(p: argparse.ArgumentParser, f: Field) -> None:
    """One ``--flag`` per ConvertOptions field: its type, default, choices and help from the field."""
    meta = f.metadata
    kind = {"bool": bool, "int": int, "float": float}.get(str(f.type), str)
    if kind is bool:
        p.add_argument(
            flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
            help=f"{meta['help']} (default: %(default)s)",
        )
        return
    p.add_argument(
        flag(f.name), dest=f.name, type=kind, choices=meta["choices"], default=f.default,
        help=f"{meta['help']} (default: %(default)s)",
    )


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _row_ptr_nbytes(q: QuantEaseConfig, out_features: int, in_features: int) -> int:
    dtype, (n,) = expected_tensors(q, out_features, in_features)[ROW_PTR]
    return n * dtype.itemsize


def summary(r: ConvertReport) -> str:
    """Human-readable account of what was written and what it costs per weight."""
    q = r.qcfg
    weights = sum(o * i for o, i in r.shapes.values())
    total = sum(linear_nbytes(q, o, i, r.nnz[n]) for n, (o, i) in r.shapes.items())
    grid = sum(linear_nbytes(q, o, i, 0) - _row_ptr_nbytes(q, o, i) for o, i in r.shapes.values())
    outliers = total - grid  # values, column indices and row pointers
    size = sum(f.stat().st_size for f in r.output.iterdir() if f.is_file())
    original = sum(f.stat().st_size for f in r.source.glob("*.safetensors"))
    errors = [e for e in q.provenance["relative_error"].values() if e is not None]
    kept = ", ".join(q.modules_to_not_convert) or "none"
    symmetry = "sym" if q.sym else "asym"
    rows = [
        (
            "model",
            f"{r.source.name} ({r.architecture}), {len(r.shapes)} linears quantized, {kept} kept",
        ),
        (
            "quantization",
            f"{q.provenance['method']}, {q.bits}-bit, group {q.group_size}, {symmetry}, "
            f"outliers {100 * q.outlier_fraction:.2f}% {q.outlier_structure}",
        ),
        (
            "bits/weight",
            f"{8 * total / weights:.3f} effective over {weights / 1e6:.2f} M quantized weights "
            f"(codes+scales+zeros {8 * grid / weights:.3f}, outliers {8 * outliers / weights:.3f})",
        ),
        ("size on disk", f"{_mb(size)} vs {_mb(original)} original ({size / original:.2f}x)"),
    ]
    if errors:
        rows.append(
            (
                "recon. error",
                f"mean {sum(errors) / len(errors):.3e}, max {max(errors):.3e} "
                "(relative, per layer; all in config.json provenance)",
            )
        )
    rows.append(("time", f"{r.seconds:.1f} s"))
    lines = [f"qe-convert: wrote {r.output}"] + [f"  {k:<15} {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own progress and one-line errors
    opts = ConvertOptions(**{f.name: getattr(args, f.name) for f in fields(ConvertOptions)})
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    prog = "qe-convert"
    try:
        ranks = distributed.init_from_env(args.dist_timeout)
        if ranks.world > 1:
            prog = f"qe-convert (process {ranks.rank} of {ranks.world})"
        with logging_redirect_tqdm():
            report = convert(
                args.model,
                args.output,
                opts,
                device=args.device,
                resume=args.resume,
                overwrite=args.overwrite,
                max_shard_bytes=args.max_shard_size,
            )
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except distributed.PeerFailure as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    distributed.leave()  # only after success: leaving a group whose peer died can hang
    if ranks.leader:
        print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
