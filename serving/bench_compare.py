"""Serve bf16 SmolLM2 and its QuantEase conversions one after another; compare memory and speed.

For each configuration (default: the bf16 model, W4 g128 + 1% outliers, W3 g128 + 1%
outliers, both ``qe-convert --method rtn``), back to back on the same machine:

1. start ``vllm serve`` with the CPU flags of ``serving/launch.py`` on a free loopback
   port (``serving/server.py``);
2. record resident memory over the server's processes (RSS and PSS), vLLM's
   "Model loading took" line and, for QuantEase, the plugin's resident-weights line
   ("QuantEase: N linear layers resident in X MiB (R of their 16-bit size ...)");
3. run ``serving/bench.py`` (concurrency 1/4/16 by default) and stop the server.

The bf16 baseline for the weight-memory ratio is measured, not assumed: the bytes of the
same linear layers in the bf16 checkpoint (identical to the plugin's "16-bit size").
Writes ``<out>/bench_compare.json`` and a Markdown report (default
``serving/results.md``) with the exact commands, the machine, load averages and the
ratios against the targets. ``--rounds 2`` repeats the whole sequence (A B C A B C) so
drift from other load on the machine shows up.

::

    python serving/bench_compare.py                       # ~15-25 min on 2 CPU cores
    python serving/bench_compare.py --eager --requests 16 --max-seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from serving import paths
except ImportError:  # run as `python serving/bench_compare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from serving import paths
from serving.bench import PROMPTS, machine_info, run_levels
from serving.launch import serve_args
from serving.server import VllmServer

RESIDENT_RE = re.compile(
    r"QuantEase: (\d+) linear layers resident in ([\d.]+) MiB \(([\d.]+) of their 16-bit size "
    r"([\d.]+) MiB; (\d+) outliers\)"
)
KERNEL_RE = re.compile(r"QuantEase: layers of at most 4 bits use ([^;]+);")
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_WEIGHT_RATIO = 0.35
TARGET_TPS_RATIO = 0.8


@dataclass
class Config:
    name: str
    model: Path
    convert_args: list[str] | None
    """``qe-convert`` flags that produce ``model`` (None: an original checkpoint)."""


def bf16_linear_mib(model_dir: Path) -> float:
    """MiB of the decoder's linear weights in a 16-bit checkpoint (the resident bf16 baseline)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k.endswith(".weight") and k.rsplit(".", 2)[-2] in LINEAR_SUFFIXES:
                    sl = sf.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * 2
    return total / 2**20


def convert_cmd(source: Path, out: Path, flags: list[str]) -> list[str]:
    exe = Path(sys.executable).parent / "qe-convert"
    return [str(exe), "--model", str(source), "--output", str(out), *flags]


def ensure_checkpoint(cfg: Config, source: Path) -> None:
    if cfg.convert_args is None or paths.quantease_ckpt_is_complete(cfg.model):
        return
    cmd = convert_cmd(source, cfg.model, cfg.convert_args)
    print(f"[compare] $ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})


def server_log(out_dir: Path, name: str, round_no: int) -> Path:
    return out_dir / f"server-{name}-r{round_no}.log"


def log_facts(log_text: str) -> dict:
    """What the plugin logged at load: resident weights and the CPU kernel it chose."""
    facts: dict = {}
    if m := RESIDENT_RE.search(log_text):
        facts["resident"] = {"layers": int(m.group(1)), "mib": float(m.group(2)),
                             "ratio": float(m.group(3)), "dense_mib": float(m.group(4)),
                             "outliers": int(m.group(5)), "line": m.group(0)}
    if m := KERNEL_RE.search(log_text):
        facts["cpu_kernel"] = m.group(1)
    return facts


def serve_and_bench(cfg: Config, a: argparse.Namespace, out_dir: Path, round_no: int) -> dict:
    args, env = serve_args("cpu", eager=a.eager, max_model_len=a.max_model_len,
                           kv_cache_gib=a.kv_cache_gib, quantized=cfg.convert_args is not None)
    args += ["--served-model-name", cfg.name]
    log = server_log(out_dir, cfg.name, round_no)
    server = VllmServer(cfg.model, *args, env=env, log_path=log, startup_timeout=900,
                        max_lifetime=3600)
    record: dict = {"name": cfg.name, "round": round_no, "model": str(cfg.model)}
    with server:
        log_text = log.read_text(errors="replace")
        record.update(
            command=" ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(server.argv),
            startup_s=round(server.startup_seconds or 0, 1),
            rss_gib=round(server.rss_bytes() / 2**30, 3),
            pss_gib=round(server.pss_bytes() / 2**30, 3),
            processes=server.processes(),
        )
        record.update(log_facts(log_text))
        record["bench"] = run_levels(server.url, cfg.name, a.concurrency, a.requests,
                                     a.max_seconds, a.max_tokens)
        record["peak_rss_gib"] = round(server.peak_rss_bytes / 2**30, 3)
    return record


def _level(record: dict, c: int) -> dict:
    return next(lv for lv in record["bench"]["levels"] if lv["concurrency"] == c)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def write_report(result: dict, path: Path) -> None:
    """``results.md``: commands, machine, tables, and the ratios against the targets."""
    runs = result["runs"]
    names = list(dict.fromkeys(r["name"] for r in runs))
    base = names[0]
    conc = result["args"]["concurrency"]
    by_name = {n: [r for r in runs if r["name"] == n] for n in names}
    tps = {n: {c: _median([_level(r, c)["output_tokens_per_s"] for r in rs]) for c in conc}
           for n, rs in by_name.items()}
    lines = [
        "# Serving benchmark: bf16 SmolLM2 vs QuantEase checkpoints (vLLM, CPU)",
        "",
        f"Generated by `serving/bench_compare.py` on {result['date']}. Every number below was "
        "measured in this run; configurations ran back to back on the same machine"
        + (f", {result['args']['rounds']} rounds (medians in the summary)." if result["args"]["rounds"] > 1 else "."),
        "",
        "## Machine",
        "",
        f"* CPU: {result['machine']['cpu']}, {result['machine']['cpus']} logical CPUs, "
        f"{result['machine']['mem_gib']} GiB RAM; {result['machine']['platform']}",
        f"* vLLM {result['versions']['vllm']}, torch {result['versions']['torch']}; the vLLM "
        "worker is pinned to one core (`VLLM_CPU_OMP_THREADS_BIND=auto` reserves the other "
        "for the API server and engine loop).",
        "* Other jobs shared the machine: load averages (1/5/15 min) are listed per run.",
        "",
        "## Commands",
        "",
        "```bash",
        f"python serving/bench_compare.py {' '.join(result['argv'])}",
    ]
    for name in names:
        conv = result["convert_commands"].get(name)
        if conv:
            lines.append(conv)
    for r in runs:
        if r["round"] == 1:
            lines.append(r["command"])
    lines += [
        "```",
        "",
        f"Load: {result['args']['requests']} requests per level at most, "
        f"{result['args']['max_seconds']:g} s budget per level, {result['args']['max_tokens']} output "
        f"tokens per request (`ignore_eos`, greedy), streamed completions over {result['prompts']} fixed "
        "prompts, closed loop of C clients; one untimed warm-up request per level.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    base_mib = result["bf16_linear_mib"]
    for name in names[1:]:
        res = by_name[name][0].get("resident")
        if res:
            ratio = res["mib"] / base_mib
            lines.append(
                f"| {name}: resident linear weights <= {TARGET_WEIGHT_RATIO}x bf16 | "
                f"{res['mib']:.2f} MiB / {base_mib:.2f} MiB = **{ratio:.3f}x** | "
                f"{'yes' if ratio <= TARGET_WEIGHT_RATIO else 'no'} |"
            )
    top = max(conc)
    for name in names[1:]:
        ratio = tps[name][top] / tps[base][top]
        lines.append(
            f"| {name}: output tok/s at concurrency {top} >= {TARGET_TPS_RATIO}x bf16 | "
            f"{tps[name][top]:.1f} / {tps[base][top]:.1f} = **{ratio:.2f}x** | "
            f"{'yes' if ratio >= TARGET_TPS_RATIO else 'no'} |"
        )
    lines += [
        "",
        f"bf16 baseline for weights: the {len(LINEAR_SUFFIXES)} linear kinds of every decoder "
        f"block in the bf16 checkpoint, {base_mib:.2f} MiB (embeddings and the tied lm_head stay "
        "16-bit in every configuration and are not part of the ratio).",
        "",
        "## Memory",
        "",
        "| config | round | QuantEase resident line | CPU kernel | server RSS | server PSS | start-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        res = r.get("resident", {}).get("line", "-")
        lines.append(
            f"| {r['name']} | {r['round']} | {res} | {r.get('cpu_kernel', '-')} | "
            f"{r['rss_gib']:.2f} GiB | {r['pss_gib']:.2f} GiB | {r['startup_s']:.0f} s |"
        )
    lines += [
        "",
        "Server RSS/PSS cover all server processes (API server, engine core, worker) and "
        "include the KV cache reserved up front and each process's Python/torch runtime, so "
        "they shrink much less than the weights.",
        "",
        "## Throughput and latency",
        "",
        "| config | round | C | ok/sent | req/s | out tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | load avg before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for lv in r["bench"]["levels"]:
            t, i = lv["ttft_ms"], lv["itl_ms"]
            lines.append(
                f"| {r['name']} | {r['round']} | {lv['concurrency']} | {lv['requests_ok']}/{lv['requests_sent']} | "
                f"{lv['requests_per_s']:.2f} | {lv['output_tokens_per_s']:.1f} | "
                f"{t.get('p50', 0):.0f} / {t.get('p90', 0):.0f} / {t.get('p99', 0):.0f} | "
                f"{i.get('p50', 0):.1f} / {i.get('p90', 0):.1f} / {i.get('p99', 0):.1f} | "
                f"{' / '.join(str(x) for x in lv['loadavg_before'])} |"
            )
    lines += ["", "Output tokens/s relative to bf16 (median over rounds):", ""]
    lines += ["| config | " + " | ".join(f"C={c}" for c in conc) + " |",
              "|---|" + "---|" * len(conc)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{tps[name][c] / tps[base][c]:.2f}x" for c in conc) + " |")
    if result.get("notes"):
        lines += ["", "## Notes", "", result["notes"]]
    path.write_text("\n".join(lines) + "\n")


def finish(result: dict, a: argparse.Namespace) -> int:
    """Attach ``--notes``, write the Markdown report and the JSON beside the server logs."""
    if a.notes:
        result["notes"] = a.notes.read_text()
    write_report(result, a.report)
    (a.out_dir / "bench_compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"[compare] wrote {a.report} and {a.out_dir / 'bench_compare.json'}")
    return 0


def rerender(a: argparse.Namespace) -> int:
    result = json.loads((a.out_dir / "bench_compare.json").read_text())
    for run in result["runs"]:
        log = server_log(a.out_dir, run["name"], run["round"])
        if log.is_file():
            run.update(log_facts(log.read_text(errors="replace")))
    return finish(result, a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=paths.default_model_dir(), help="bf16 model")
    ap.add_argument("--bits", default="4,3", help="QuantEase bit widths to compare")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager for every server")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out-dir", type=Path, default=paths.cache_dir() / "bench")
    ap.add_argument("--report", type=Path, default=Path(__file__).with_name("results.md"))
    ap.add_argument("--notes", type=Path, help="Markdown appended to the report as 'Notes'")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the report from <out-dir>/bench_compare.json and the server "
                    "logs beside it (e.g. to add --notes); serves nothing")
    a = ap.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        return rerender(a)
    source = a.model.expanduser().resolve()
    configs = [Config("bf16", source, None)]
    for bits in (int(b) for b in a.bits.split(",")):
        flags = ["--method", "rtn", "--bits", str(bits), "--group-size", "128",
                 "--outlier-fraction", "0.01"]
        configs.append(Config(f"w{bits}-g128-o1", paths.ckpt_dir(f"bench-w{bits}-g128-o1"), flags))
    for cfg in configs:
        ensure_checkpoint(cfg, source)

    import torch
    import vllm

    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "argv": sys.argv[1:] if argv is None else argv,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "machine": machine_info(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "prompts": len(PROMPTS),
        "bf16_linear_mib": round(bf16_linear_mib(source), 3),
        "convert_commands": {c.name: shlex.join(convert_cmd(source, c.model, c.convert_args))
                             for c in configs if c.convert_args},
        "runs": [],
    }
    for round_no in range(1, a.rounds + 1):
        for cfg in configs:
            result["runs"].append(serve_and_bench(cfg, a, a.out_dir, round_no))
            (a.out_dir / "bench_compare.json").write_text(json.dumps(result, indent=2) + "\n")
    return finish(result, a)


if __name__ == "__main__":
    sys.exit(main())
