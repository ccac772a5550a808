"""vLLM refuses broken or mismatched QuantEase checkpoints while it builds its config.

The quantease method's ``maybe_update_config`` runs ``validate_checkpoint``
before any weight is read, so ``LLM(...)`` and ``vllm serve`` stop at start-up
with the same message the transformers loader gives (the cases and corruptions
are those of tests/helpers/broken_checkpoints.py); never a crash in a weight
loader or a kernel. The ``--quantization`` flag must agree with the checkpoint
both ways. Each case is its own vLLM process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.broken_checkpoints import CASES, assert_message, broken
from helpers.generation import GENERATE

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", ["missing-tensor", "corrupt-header"])
def test_vllm_refuses_before_loading(good: Path, tmp_path: Path, case: str) -> None:
    ckpt = broken(good, tmp_path, case)
    cmd = [sys.executable, str(GENERATE), str(ckpt), str(tmp_path / "out.json"), "--quantization", "quantease"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode != 0 and not (tmp_path / "out.json").exists()
    assert_message(proc.stderr, case)
    assert "Starting to load model" not in proc.stderr  # refused while vLLM builds its config


@pytest.mark.parametrize(
    ("case", "flags", "expected"),
    [
        ("row-ptr-decreasing", ["--quantization", "quantease"], ("invalid QuantEase checkpoint",)),
        ("plain-with-quantease", ["--quantization", "quantease"], ("quantease",)),
        ("quantease-with-awq", ["--quantization", "awq"], ("quantease", "awq", "does not match")),
    ],
)
def test_vllm_serve_fails_at_startup(
    good: Path, tiny_llama: Path, tmp_path: Path, case: str, flags: list[str], expected: tuple[str, ...]
) -> None:
    from serving.server import ServerError, VllmServer

    model = {"plain-with-quantease": tiny_llama, "quantease-with-awq": good}.get(case)
    model = model or broken(good, tmp_path, case)
    server = VllmServer(model, *flags, "--max-model-len", "128", "--enforce-eager",
                        startup_timeout=240, max_lifetime=300, log_path=tmp_path / "serve.log", quiet=True)
    with pytest.raises(ServerError) as info:
        server.start()
    log = (tmp_path / "serve.log").read_text()
    assert "during start-up" in str(info.value)
    for part in expected:
        assert part in log, (case, part, log[-3000:])
    if case in CASES:
        assert_message(log, case)
        assert "Starting to load model" not in log
