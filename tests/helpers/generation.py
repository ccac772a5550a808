"""vLLM generations outside the pytest process, and how to compare two of them.

``generate`` hands a job to one long-lived worker process (``vllm_generate.py --worker``,
next to this file), started on first use and shared by the whole test session: every
engine starts in that process, so only the first generation pays for importing vLLM.
``fresh=True`` runs a job in a process of its own instead, for what a shared process
cannot give: a vLLM that never loaded our plugin (``VLLM_PLUGINS=none``). The script
lives here, not in ``tests/``, because a script's directory is the first entry of its
``sys.path`` and ``tests/qe_vllm`` would shadow the package. Used by the slow tests in
tests/qe_vllm/test_vllm_method.py, tests/qe_vllm/test_reliability_vllm.py,
tests/converters/test_export.py and tests/converters/test_transformers_loading.py.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

GENERATE = Path(__file__).with_name("vllm_generate.py")
JOB_TIMEOUT = 600

# Logprob drift that is not ours: vLLM's CPU platform runs dense layers through its own
# GEMMs (oneDNN / sgl-kernel, chosen by shape) while the quantease paths call F.linear
# (exact path) or torch's int4 GEMM (default), each summing in its own order, and
# at TP=2 bf16 partial sums are all-reduced. On the 2-block SmolLM2 cut (huge logits) this
# moves logprobs by up to ~0.07 with identical tokens; the exact path at TP=1 is checked at 1e-3.
GEMM_DRIFT_TOL = 0.15


def _serving_env() -> dict[str, str]:
    """The tests' environment as a user's would be: without the Triton interpreter that
    tests/conftest.py exports."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


class Worker:
    """The session's generation process: jobs in on stdin, answers on a pipe, logs to a file."""

    def __init__(self) -> None:
        self.log = Path(tempfile.mkdtemp(prefix="vllm-worker-")) / "worker.log"
        read_fd, write_fd = os.pipe()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(GENERATE), "--worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                pass_fds=(write_fd,), env=_serving_env(),
            )
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)

    def run(self, job: dict) -> dict:
        """Send ``job``; its answer, or a failure naming the worker's last log lines."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.replies], [], [], JOB_TIMEOUT)
        line = self.replies.readline() if ready else ""
        if not line:
            self.stop()
            return {"ok": False, "error": "the vLLM worker died or timed out:\n" + self.tail()}
        return json.loads(line)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_worker: Worker | None = None


def _shared_worker() -> Worker:
    global _worker
    if _worker is None or _worker.proc.poll() is not None:
        _worker = Worker()
        atexit.register(_worker.stop)
    return _worker


def generate(
    model: Path, out: Path, *, tp: int = 1, mode: str = "eager", quantization: str | None = None,
    env: dict[str, str] | None = None, dtype: str = "bfloat16", fresh: bool = False,
) -> list[dict]:
    """Greedy generations of ``model`` on ``vllm_generate.PROMPTS``, written to ``out`` and returned."""
    if fresh:
        cmd = [sys.executable, str(GENERATE), str(model), str(out), "--tp", str(tp), "--mode", mode,
               "--dtype", dtype] + (["--quantization", quantization] if quantization else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT,
                              env={**_serving_env(), **(env or {})})
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        job = {"model": str(model), "out": str(out), "tp": tp, "mode": mode,
               "quantization": quantization, "dtype": dtype, "env": env or {}}
        answer = _shared_worker().run(job)
        assert answer["ok"], answer["error"]
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
