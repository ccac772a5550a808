"""Choose qe-convert's defaults on *validation* text, over several calibration seeds.

Never the WikiText-2 test split: that is what ``benchmarks/quality.py`` reports
on. Here the text is split so that no validation token is ever calibrated on:

* in-domain calibration: the first 70% of WikiText-2 v1 *valid*; validation on
  its last 30% (in domain) and on *Northanger Abbey* (another domain);
* out-of-domain calibration: *Emma*, *Mansfield Park*, *Sense and Sensibility*;
  validation on the same two texts (WikiText is then the unseen domain).

*Pride and Prejudice* is used nowhere here (it stays a fresh text for reports).
Each (configuration, calibration, seed) converts SmolLM2 with the real
pipeline, evaluates perplexity with the ``qe-eval`` code and stores one JSON
file, so an interrupted run resumes. The table gives mean ± std over seeds.

    python benchmarks/tune_defaults.py --configs gptq,qe-ts-p1 --seeds 0,1,2 --calib wiki
    python benchmarks/tune_defaults.py --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
STORE = RESULTS / "defaults"
DATA = Path(os.environ.get("QE_DATA_DIR", REPO.parent / "shared" / "data"))
MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"

TEXTBOOK = {
    "true_sequential": False, "propagation": 0.0, "shrink": 0.0, "cd_damp": 0.0, "act_order": False, "mse_grid": False,
}
TOKENS = {"ts": ("true_sequential", True), "ao": ("act_order", True), "mse": ("mse_grid", True)}
PREFIXES = {"p": "propagation", "s": "shrink", "cd": "cd_damp"}


def parse_config(name: str) -> dict[str, Any]:
    """``default``, or ``{gptq,qe}[-ts][-pA][-sS][-cdC][-ao][-mse]`` over textbook settings.

    Numbers are written without the decimal point: ``p05`` = 0.5, ``s01`` = 0.1, ``p1`` = 1.
    """
    if name == "default":
        return {}
    method, *rest = name.split("-")
    config = {"method": {"qe": "quantease", "gptq": "gptq"}[method], **TEXTBOOK}
    for token in rest:
        if token in TOKENS:
            field, value = TOKENS[token]
        else:
            prefix = "cd" if token.startswith("cd") else token[0]
            digits = token[len(prefix):]
            field, value = PREFIXES[prefix], float(digits[0] + "." + digits[1:]) if len(digits) > 1 else float(digits)
        config[field] = value
    return config


def splits(scratch: Path) -> dict[str, Path]:
    """Calibration and validation texts, written once into ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    wiki = (DATA / "wikitext-2-v1-valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(0.7 * len(wiki))
    files = {"wiki-head": "".join(wiki[:cut]), "wiki-tail": "".join(wiki[cut:])}
    for name, text in files.items():
        path = scratch / f"{name}.txt"
        if not path.exists():
            path.write_text(text, encoding="utf-8")
    austen = scratch / "austen-calib"
    austen.mkdir(exist_ok=True)
    for novel in ("emma", "mansfieldpark", "sensesensibility"):
        link = austen / f"{novel}.txt"
        if not link.exists():
            link.symlink_to(DATA / "austen" / f"{novel}.txt")
    return {
        "wiki": scratch / "wiki-head.txt",
        "austen": austen,
        "val:wiki-tail": scratch / "wiki-tail.txt",
        "val:northanger": DATA / "austen" / "northangerabbey.txt",
    }


def run_one(name: str, calib: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from qe_vllm.cli.eval import evaluate
    from qe_vllm.converters.options import ConvertOptions
    from qe_vllm.converters.pipeline import convert

    texts = splits(args.scratch)
    opts = ConvertOptions(
        **{
            "bits": args.bits,
            "group_size": args.group_size,
            "outlier_fraction": args.outlier_fraction,
            **parse_config(name),
            "calib_data": str(texts[calib]),
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": seed,
        }
    )
    out = args.scratch / f"ckpt-{name}-{calib}-{seed}-{os.getpid()}"
    t0 = time.perf_counter()
    convert(str(args.model), out, opts, device="cpu", overwrite=True)
    convert_s = time.perf_counter() - t0
    ppl = {}
    for key in ("val:wiki-tail", "val:northanger"):
        ev = evaluate(str(out), str(texts[key]), 2048, args.windows, "float32", "cpu")
        ppl[key.removeprefix("val:")] = ev["ppl"]
    shutil.rmtree(out)
    return {
        "config": name, "calib": calib, "seed": seed, "options": parse_config(name),
        "bits": args.bits, "group_size": args.group_size, "outlier_fraction": args.outlier_fraction,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "windows": args.windows,
        "ppl": ppl, "convert_seconds": convert_s,
    }


def key(name: str, calib: str, seed: int, args: argparse.Namespace) -> Path:
    of = f"-o{args.outlier_fraction:g}" if args.outlier_fraction else ""
    tag = f"w{args.bits}-g{args.group_size}{of}-n{args.nsamples}x{args.seqlen}-ev{args.windows}"
    return STORE / f"{name}__{calib}__s{seed}__{tag}.json"


def report() -> str:
    rows: dict[tuple, list[dict[str, Any]]] = {}
    for f in sorted(STORE.glob("*.json")):
        r = json.loads(f.read_text())
        setting = (r["bits"], r["group_size"], r["outlier_fraction"], r["nsamples"], r["seqlen"], r["windows"])
        rows.setdefault((setting, r["calib"], r["config"]), []).append(r)
    lines = [
        "| setting | calibration | config | seeds | wiki-tail ppl (mean ± std) | northanger ppl (mean ± std) | convert s |",
        "|---|---|---|---|---|---|---|",
    ]

    def stat(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    for (setting, calib, config), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], statistics.mean(r["ppl"]["wiki-tail"] for r in kv[1]))):
        bits, gs, of, n, sl, ev = setting
        label = f"W{bits} g{gs}" + (f" +{of:.0%}" if of else "") + f", {n}x{sl}, {ev} windows"
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(
            f"| {label} | {calib} | {config} | {seeds} | {stat([r['ppl']['wiki-tail'] for r in rs])} "
            f"| {stat([r['ppl']['northanger'] for r in rs])} | {statistics.mean(r['convert_seconds'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--configs", default="gptq,qe,qe-ts,qe-ts-p05", help=f"comma list; {parse_config.__doc__}"
    )
    p.add_argument("--calib", default="wiki", help="comma list of wiki,austen")
    p.add_argument("--seeds", default="0", help="comma list of calibration seeds")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--outlier-fraction", type=float, default=0.0)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=6, help="2048-token windows per validation text")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/qe-tune"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    STORE.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in args.configs.split(","):
            for calib in args.calib.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    path = key(name, calib, seed, args)
                    if path.exists():
                        continue
                    print(f"== {name} {calib} seed {seed}", flush=True)
                    result = run_one(name, calib, seed, args)
                    result["machine"] = f"{platform.node()} {platform.processor()} {os.cpu_count()} cpus"
                    result["command"] = " ".join(sys.argv)
                    path.write_text(json.dumps(result, indent=1))
                    print(json.dumps(result["ppl"]), flush=True)
    table = report()
    (RESULTS / "defaults_table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
