"""Load benchmark for a running OpenAI-compatible server (vLLM): throughput and latency.

Sends a fixed, deterministic prompt set as streamed ``/v1/completions`` requests at each
concurrency level (a closed loop: ``C`` clients, each sending its next request as soon
as the previous one finished), and reports per level:

* requests/s and output tokens/s over the level's wall time;
* TTFT (time to first streamed token) and inter-token latency (gaps between streamed
  tokens, per request), p50/p90/p99; end-to-end latency percentiles.

Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos``, greedy), so two
models are compared on the same amount of work whatever text they produce. Each level is
bounded by a request count *and* a time budget (no new request after the budget; those
in flight finish). The target must be a loopback address: this tool never sends load
anywhere else.

::

    python serving/bench.py --url http://127.0.0.1:8000 --model smollm2-w4 \\
        --concurrency 1,4,16 --requests 32 --max-seconds 120 --output bench.json

``serving/bench_compare.py`` starts the servers it compares and calls :func:`run_levels`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

# Fixed prompt set: varied openings of similar length, cycled in order by every level.
PROMPTS = (
    "The history of the printing press begins in",
    "Write a short story about a lighthouse keeper who",
    "Explain to a ten-year-old why the sky is blue:",
    "The three most important things to know about volcanoes are",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists.\"\"\"\n",
    "A recipe for a simple tomato soup: first,",
    "In economics, inflation is defined as",
    "Dear hiring manager, I am writing to apply for",
    "The main differences between cats and dogs as pets are",
    "Once upon a time in a small village by the sea,",
    "The theory of evolution by natural selection states that",
    "Here is a list of tips for learning a new language:\n1.",
    "The capital of Australia is Canberra, which was chosen because",
    "Photosynthesis is the process by which plants",
    "To fix a flat bicycle tire, you will need",
    "The most famous paintings of the Renaissance include",
)
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One streamed request: timings relative to its own start (seconds)."""

    ok: bool
    latency: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    """Aggregates for one concurrency level."""

    concurrency: int
    requests_sent: int
    requests_ok: int
    requests_failed: int
    wall_seconds: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    latency_ms: dict[str, float]
    errors: list[str]


def require_loopback(url: str) -> None:
    """Refuse any target that is not a loopback address (the benchmark is local only)."""
    host = urlparse(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"refusing to load {url!r}: only loopback servers (127.0.0.1, ::1, localhost)")


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 (plus mean) of ``values`` times ``scale``; empty dict if none."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * scale for p in PERCENTILES}
    out["mean"] = sum(ordered) / len(ordered) * scale
    return {k: round(v, 3) for k, v in out.items()}


async def _one_request(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int,
    timeout: float,
) -> RequestResult:
    payload = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False, latency=0.0)
    streamed = 0
    try:
        async with session.post(
            url + "/v1/completions", json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                streamed += 1
        result.ok = True
        result.output_tokens = result.output_tokens or streamed
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"[:200]
    result.latency = time.perf_counter() - start
    return result


async def run_level(
    url: str, model: str, concurrency: int, requests: int, max_seconds: float,
    max_tokens: int, request_timeout: float = 600.0,
) -> LevelResult:
    """Closed loop of ``concurrency`` clients until ``requests`` were sent or time is up."""
    results: list[RequestResult] = []
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            prompt = PROMPTS[sent % len(PROMPTS)]
            sent += 1
            results.append(
                await _one_request(session, url, model, prompt, max_tokens, request_timeout)
            )

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # One untimed request first: the first call after start-up pays one-off costs.
        await _one_request(session, url, model, PROMPTS[0], max_tokens, request_timeout)
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency,
        requests_sent=sent,
        requests_ok=len(ok),
        requests_failed=len(results) - len(ok),
        wall_seconds=round(wall, 3),
        requests_per_s=round(len(ok) / wall, 4),
        output_tokens=tokens,
        output_tokens_per_s=round(tokens / wall, 3),
        ttft_ms=percentiles([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=percentiles([gap for r in ok for gap in r.itl]),
        latency_ms=percentiles([r.latency for r in ok]),
        errors=sorted({r.error for r in results if r.error})[:5],
    )


def run_levels(
    url: str, model: str, concurrencies: list[int], requests: int, max_seconds: float,
    max_tokens: int,
) -> dict:
    """Every level in order; the result is JSON-ready and records the conditions it ran in."""
    require_loopback(url)
    levels = []
    for c in concurrencies:
        load_before = os.getloadavg()
        level = asyncio.run(run_level(url, model, c, requests, max_seconds, max_tokens))
        levels.append({**asdict(level), "loadavg_before": [round(x, 2) for x in load_before],
                       "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
        print(
            f"[bench] c={c:>3}: {level.requests_ok}/{level.requests_sent} ok in "
            f"{level.wall_seconds:.1f} s, {level.requests_per_s:.2f} req/s, "
            f"{level.output_tokens_per_s:.1f} out tok/s, TTFT p50 {level.ttft_ms.get('p50', 0):.0f} ms, "
            f"ITL p50 {level.itl_ms.get('p50', 0):.1f} ms",
            flush=True,
        )
    return {
        "url": url,
        "model": model,
        "max_tokens": max_tokens,
        "requests_per_level": requests,
        "max_seconds_per_level": max_seconds,
        "prompts": len(PROMPTS),
        "machine": machine_info(),
        "levels": levels,
    }


def machine_info() -> dict:
    """CPU model, core count, memory and load: what a reader needs to compare numbers."""
    from qe_vllm.machine import cpu_model, mem_gib

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "mem_gib": mem_gib(),
            "platform": platform.platform(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="served model name")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (max)")
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="time budget per level: no new request after it")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--output", type=Path, help="write the JSON result here")
    a = ap.parse_args(argv)
    try:
        result = run_levels(a.url.rstrip("/"), a.model, [int(c) for c in a.concurrency.split(",")],
                            a.requests, a.max_seconds, a.max_tokens)
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
