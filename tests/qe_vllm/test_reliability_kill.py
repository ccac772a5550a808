"""``kill -9`` in the middle of a conversion, then ``--resume``: same bytes as an uninterrupted run.

A real ``qe-convert`` process is killed with SIGKILL as soon as block 0 of 2 is
saved (no handler, no cleanup runs). The re-run refuses to start over silently,
``--resume`` continues from block 1, and every file of the result has the same
sha256 as the checkpoint of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.env import OFFLINE_ENV, run_script
from qe_vllm.cli import convert as cli
from qe_vllm.converters import staging
from qe_vllm.converters.checkpoint import partial_dir

QE_CONVERT = str(Path(sys.executable).parent / "qe-convert")


def digests(model_dir: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(model_dir.iterdir())}


def kill_after_block_0(cmd: list[str], output: Path, log: Path, timeout: float = 300) -> int:
    """Run ``cmd``; SIGKILL it the moment its progress marker says block 0 is done."""
    progress = partial_dir(output) / "_work" / "progress.json"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **OFFLINE_ENV})
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if progress.exists() and json.loads(progress.read_text())["next_block"] >= 1:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
        proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def args(tiny_llama: Path, calib_text: Path) -> list[str]:
    return ["--model", str(tiny_llama), "--method", "gptq", "--bits", "3", "--group-size", "64",
            "--outlier-fraction", "0.01", "--calib-data", str(calib_text), "--nsamples", "8",
            "--seqlen", "128", "--seed", "11", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "reference"
    r = run_script("qe-convert", *args, "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_sigkill_then_resume_is_byte_identical(args: list[str], reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    rc = kill_after_block_0([QE_CONVERT, *args, "--output", str(out)], out, tmp_path / "killed.log")
    assert rc == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not out.exists()
    work = partial_dir(out) / "_work"
    assert json.loads((work / "progress.json").read_text()) == {"next_block": 1}
    assert not (partial_dir(out) / "config.json").exists()

    again = run_script("qe-convert", *args, "--output", out)
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr

    resumed = run_script("qe-convert", *args, "--output", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "blocks:  50%" in resumed.stderr  # started from block 1, block 0 came from disk
    assert not partial_dir(out).exists()
    assert digests(out) == digests(reference)


def test_interrupted_between_inputs_and_marker(
    args: list[str], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the last block's outputs are saved but before its progress marker.

    The marker still says "block 1", so resume must find block 1's *inputs*, not
    the outputs that were just written: inputs are stored per block for this.
    """
    real = staging._replace_text

    def stop_at_last_marker(path: Path, text: str) -> None:
        if path.name == "progress.json" and json.loads(text)["next_block"] == 2:
            raise KeyboardInterrupt
        real(path, text)

    out = tmp_path / "out"
    monkeypatch.setattr(staging, "_replace_text", stop_at_last_marker)
    assert cli.main([*args, "--output", str(out)]) == 130
    assert json.loads((partial_dir(out) / "_work" / "progress.json").read_text()) == {"next_block": 1}
    monkeypatch.setattr(staging, "_replace_text", real)
    assert cli.main([*args, "--output", str(out), "--resume"]) == 0
    assert digests(out) == digests(reference)
