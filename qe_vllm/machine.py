"""What a measurement ran on: the facts a reader needs before comparing two numbers.

Shared by the benchmark scripts (``benchmarks/``, ``serving/bench.py``); standard library only,
so it runs on a GPU machine with nothing but torch installed.
"""

from __future__ import annotations

import platform
from pathlib import Path


def _proc_field(path: str, key: str) -> str | None:
    """The value of the first ``key: value`` line of a ``/proc`` file, or None off Linux."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def mem_gib() -> float | None:
    """Total RAM in GiB (``/proc/meminfo``), None where unknown."""
    total = _proc_field("/proc/meminfo", "MemTotal")
    return None if total is None else round(int(total.split()[0]) / 2**20, 1)
