"""vLLM generations in fresh processes, and how to compare two of them.

``generate`` runs ``vllm_generate.py`` (next to this file) in a subprocess, so every model
gets a clean vLLM; the script lives here, not in ``tests/``, because a script's directory
is the first entry of its ``sys.path`` and ``tests/qe_vllm`` would shadow the package.
Used by the slow tests in tests/qe_vllm/test_vllm_method.py, tests/qe_vllm/test_reliability_vllm.py,
tests/converters/test_export.py and tests/converters/test_transformers_loading.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GENERATE = Path(__file__).with_name("vllm_generate.py")

# Logprob drift that is not ours: vLLM's CPU platform runs dense layers through its own
# GEMMs (oneDNN / sgl-kernel, chosen by shape) while the quantease paths call F.linear
# (exact path) or torch's int4 GEMM (default), each summing in its own order, and
# at TP=2 bf16 partial sums are all-reduced. On the 2-block SmolLM2 cut (huge logits) this
# moves logprobs by up to ~0.07 with identical tokens; the exact path at TP=1 is checked at 1e-3.
GEMM_DRIFT_TOL = 0.15


def generate(
    model: Path, out: Path, *, tp: int = 1, mode: str = "eager", quantization: str | None = None,
    env: dict[str, str] | None = None, dtype: str = "bfloat16",
) -> list[dict]:
    cmd = [sys.executable, str(GENERATE), str(model), str(out), "--tp", str(tp), "--mode", mode,
           "--dtype", dtype]
    if quantization:
        cmd += ["--quantization", quantization]
    # Serve as a user would: without the Triton interpreter that tests/conftest.py exports.
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**base, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_same_generation(
    got: list[dict], want: list[dict], logprob_tol: float, prompt_tol: float | None = None
) -> None:
    """Same greedy tokens, with logprobs within ``logprob_tol``, up to a near-tie.

    Two runs whose logprobs differ by up to ``logprob_tol`` may legitimately pick
    different tokens where the reference's best two candidates are within twice that
    (each may move by ``logprob_tol``; the 2-block SmolLM2 cut produces such ties, some
    exact); a divergence anywhere else fails. Logprobs are compared up to the divergence.
    With ``prompt_tol``, the teacher-forced prompt logprobs (the same tokens in both runs,
    so comparable even after a divergence) must agree within it everywhere.
    """
    for g, w in zip(got, want, strict=True):
        if prompt_tol is not None:
            drift = [abs(a - b) for a, b in zip(g["prompt_logprobs"], w["prompt_logprobs"], strict=True)]
            assert max(drift) <= prompt_tol, (max(drift), w["text"])
        diverge = next((i for i, (a, b) in enumerate(zip(g["token_ids"], w["token_ids"])) if a != b), None)
        if diverge is not None:
            assert w["margins"][diverge] <= 2 * logprob_tol, (diverge, g["text"], w["text"])
        n = len(w["token_ids"]) if diverge is None else diverge
        assert len(g["token_ids"]) == len(w["token_ids"]), (g["text"], w["text"])
        drift = [abs(a - b) for a, b in zip(g["logprobs"][:n], w["logprobs"][:n])]
        assert max(drift, default=0.0) <= logprob_tol, (drift, g["text"], w["text"])
