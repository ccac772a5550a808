"""Wall time of one conversion on 1 process and on N (torchrun), and whether the bytes agree.

    python benchmarks/distributed_time.py --model .cache/models/SmolLM2-135M-Instruct \\
        --calib-data $DATA/wikitext-2-v1-valid.txt [--procs 1,2] [--nsamples 32] [--seqlen 512] \\
        [--bits 3] [--group-size 128] [--work /tmp/qe-dist] [--json benchmarks/results/distributed_time.json]

Each process runs one torch thread (``OMP_NUM_THREADS=1``, also what torchrun
sets), so N processes use N cores and the checkpoints must be byte-identical
(``converters/distributed.py``). Default QuantEase otherwise. Prints a table and
writes JSON with the machine and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def command(procs: int, args: argparse.Namespace, out: Path) -> list[str]:
    convert = [
        "--model", str(args.model), "--output", str(out), "--calib-data", str(args.calib_data),
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--bits", str(args.bits),
        "--group-size", str(args.group_size), "--device", "cpu", "--overwrite",
    ]
    if procs == 1:
        return [str(BIN / "qe-convert"), *convert]
    return [str(BIN / "torchrun"), "--nproc-per-node", str(procs), "-m", "qe_vllm.cli.convert", *convert]


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib-data", type=Path, required=True)
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated; 1 first (the reference bytes)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qe-dist"))
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "distributed_time.json")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    if procs[0] != 1:
        ap.error("--procs must start with 1: its checkpoint is the reference the others are compared with")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    for n in procs:
        out = args.work / f"procs{n}"
        cmd = command(n, args, out)
        start = time.perf_counter()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"{shlex.join(cmd)} failed:\n{run.stderr[-3000:]}")
        identical = same_bytes(out, args.work / "procs1")
        rows.append({"processes": n, "seconds": round(seconds, 1), "speedup": round(rows[0]["seconds"] / seconds, 2) if rows else 1.0,
                     "same_bytes_as_1": identical, "command": shlex.join(cmd)})
        print(f"{n} process(es): {seconds:7.1f} s  speedup {rows[-1]['speedup']:.2f}x  same bytes as 1: {identical}", flush=True)
    for n in procs:
        shutil.rmtree(args.work / f"procs{n}", ignore_errors=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
