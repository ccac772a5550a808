"""Quality benchmark: RTN / textbook GPTQ / QuantEase (+ outliers) on SmolLM2-135M-Instruct.

    python benchmarks/quality.py [--seeds 0,1,2] [--nsamples 128] [--seqlen 512] [--windows 16]
                                 [--only PATTERN[,PATTERN...]] [--max-minutes M] [--results DIR]
    python benchmarks/quality.py --report-only      # regenerate quality.md/.json/.png
    python benchmarks/quality.py --list             # the plan, in priority order

What is measured (settings, plan, calibration, targets): ``quality_protocol.py``.
How one (setting, seed) is run and stored, resumably: ``quality_runner.py``.
The report, built from the stored files only: ``quality_report.py``.

Each (setting, seed) is one JSON file under ``RESULTS/quality/`` (seed and a
hash of the solver options in its name) and is skipped on a re-run with the
same protocol; runs go seed-major (every setting at the first seed, then the
next seed). ``--max-minutes`` stops cleanly after the run that crosses the
limit. After each run, and with ``--report-only``, ``RESULTS/quality.md``,
``quality.json`` and ``quality.png`` are regenerated from every seed stored
for the protocol (``--seeds`` only chooses what to run). The llm-compressor
peer rows are read from ``RESULTS/peer/`` (``benchmarks/peer_llmcompressor.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from quality_protocol import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    DEFAULT_RESULTS,
    DEFAULT_SCRATCH,
    EVAL_FILE,
    SPEC_NSAMPLES,
    SPEC_SEQLEN_CPU,
    SPEC_SEQLEN_GPU,
    Protocol,
    plan,
)

log = logging.getLogger("quality")


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: comma-separated integers, e.g. 0,1,2")
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return list(dict.fromkeys(seeds))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="SmolLM2 HF checkpoint (default %(default)s)",
    )
    a(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="shared text data directory (default %(default)s)",
    )
    a(
        "--scratch",
        type=Path,
        default=DEFAULT_SCRATCH,
        help="where checkpoints are written, then deleted",
    )
    a(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="results directory: per-run files in DIR/quality/, peer files in DIR/peer/, the report in "
        "DIR/quality.md (default %(default)s)",
    )
    a(
        "--seeds",
        type=seed_list,
        default=[0],
        help="calibration seeds to run, comma-separated (default 0); the report uses every seed stored",
    )
    a(
        "--nsamples",
        type=int,
        default=SPEC_NSAMPLES,
        help="calibration windows (default %(default)s)",
    )
    a(
        "--seqlen",
        type=int,
        default=None,
        help=f"tokens per calibration window (default {SPEC_SEQLEN_CPU} on CPU, {SPEC_SEQLEN_GPU} on GPU)",
    )
    a(
        "--windows",
        type=int,
        default=16,
        help="WikiText-2 eval windows of 2048 tokens (default %(default)s)",
    )
    a("--device", choices=("cpu", "cuda", "auto"), default="auto")
    a(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default %(default)s: on a small shared machine, oversubscribed "
        "OpenMP threads slow the column loops down many times over)",
    )
    a("--only", help="comma-separated patterns (fnmatch or substring) of setting keys to run")
    a(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after the run that crosses this many minutes",
    )
    a("--timing-nsamples", type=int, default=8, help="calibration windows for the sweep-timing Σ")
    a("--timing-repeats", type=int, default=3)
    a("--report-only", action="store_true", help="only regenerate quality.md/.json/.png")
    a("--list", action="store_true", help="print the settings in priority order and the seeds done")
    a("--progress", action="store_true", help="show tqdm progress bars")
    return p


def setup(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Threads, device, default seqlen, absolute paths, the command line, logging."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(var, "1")  # before anything imports transformers
    if not args.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seqlen is None:
        args.seqlen = SPEC_SEQLEN_GPU if args.device == "cuda" else SPEC_SEQLEN_CPU
    for name in ("model", "data", "scratch", "results"):
        setattr(args, name, getattr(args, name).expanduser().resolve())
    args.command = "python benchmarks/quality.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qe_vllm").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup(args, argv)
    from quality_report import write_report
    from quality_runner import ResultStore, RunConfig, run_all

    proto = Protocol(args.nsamples, args.seqlen, args.windows, args.timing_nsamples)
    store = ResultStore(args.results)
    rows = plan()
    if args.list:
        for s in rows:
            done = ",".join("-" if d is None else str(d) for d in store.seeds(s, proto))
            print(
                f"{done:>8}  {s.tier}  {s.key}{'  (peer: benchmarks/peer_llmcompressor.py)' if s.peer else ''}"
            )
        return 0
    if not args.report_only:
        if not (args.data / EVAL_FILE).is_file():
            print(f"quality: no {EVAL_FILE} under {args.data}", file=sys.stderr)
            return 2
        args.scratch.mkdir(parents=True, exist_ok=True)
        cfg = RunConfig(
            args.model,
            args.data,
            args.scratch,
            args.device,
            proto,
            store,
            args.timing_repeats,
            args.command,
        )
        only = [p.strip() for p in args.only.split(",")] if args.only else None
        run_all(rows, args.seeds, cfg, only, args.max_minutes, lambda: write_report(store, proto))
    out = write_report(store, proto)
    log.info("wrote %s, quality.json, quality.png", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
