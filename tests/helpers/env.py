"""Where things are and how to run the console scripts: the tests' environment.

Paths are computed from this file (``tests/helpers/env.py``), so they hold whichever
test directory imports them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
DATA_DIR = Path(os.environ.get("QE_DATA_DIR", REPO.parent / "shared" / "data"))
SMOLLM2_DIR = (
    Path(os.environ.get("QE_CACHE_DIR", REPO / ".cache")) / "models" / "SmolLM2-135M-Instruct"
)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a console script of this venv (``qe-convert``, ``qe-eval``) as a user would."""
    exe = Path(sys.executable).parent / name
    return subprocess.run(
        [str(exe), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **OFFLINE_ENV},
    )
