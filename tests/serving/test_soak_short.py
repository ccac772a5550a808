"""CI-sized soak (``serving/soak.py``): 100 requests at concurrency 16 against the quantized SmolLM2.

The full soak (2,000 requests at concurrency 32) is run by hand and committed as
``serving/soak_results.md``; this keeps its checks in CI: zero failed requests,
the memory criterion, a clean SIGTERM stop of the server, no process left over,
and a soak that itself stops cleanly (exit 143, partial results) on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.env import REPO
from serving import paths

pytestmark = pytest.mark.slow
SOAK = [sys.executable, str(REPO / "serving" / "soak.py"), "--enforce-eager", "--concurrency", "16"]


@pytest.fixture(scope="module", autouse=True)
def prepared() -> None:
    if not paths.model_is_complete(paths.default_model_dir()):
        pytest.fail("SmolLM2 not prepared: run `bash serving/setup.sh` first")


def server_processes(argv: list[str]) -> list[int]:
    """PIDs whose command line is the soak's server (its port makes it unique)."""
    port = argv[argv.index("--port") + 1]
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in cmd and port.encode() in cmd and entry.name.isdigit():
            found.append(int(entry.name))
    return found


def test_short_soak_passes(tmp_path: Path) -> None:
    prefix = tmp_path / "soak"
    proc = subprocess.run([*SOAK, "--requests", "100", "--time-limit", "150", "--results", str(prefix)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["requests"] == {"target": 100, "completed": 100, "ok": 100, "failed": 0, "errors": []}
    assert result["memory"]["passed"] and result["stop"]["clean"] and result["passed"]
    assert "**PASS**" in prefix.with_suffix(".md").read_text()
    assert server_processes(result["vllm_argv"]) == []


def test_sigterm_stops_the_soak_cleanly(tmp_path: Path) -> None:
    prefix = tmp_path / "soak"
    log = tmp_path / "soak.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*SOAK, "--requests", "100000", "--time-limit", "300", "--results", str(prefix)],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            deadline = time.monotonic() + 420
            while "requests at concurrency" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(5)  # mid-load
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["interrupted"] == "SIGTERM" and not result["passed"]
    assert result["requests"]["ok"] > 0 and result["requests"]["failed"] == 0
    assert result["stop"]["clean"] and server_processes(result["vllm_argv"]) == []
