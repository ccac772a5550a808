"""Loaders refuse broken or mismatched checkpoints at load time, with one message naming the layer.

Each case (``helpers/broken_checkpoints.py``) corrupts one copy of a good checkpoint the
way a bad copy, a buggy writer or a hand edit would, and expects :func:`validate_checkpoint`'s
message from every loader: transformers (``load_model``, fast, every case), ``qe-eval``
(one line, exit 2) and, in tests/qe_vllm/test_reliability_vllm.py, vLLM (a subprocess
per case; the message must reach stderr, or the server log of ``vllm serve``),
before any kernel runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.broken_checkpoints import CASES, assert_message, broken
from qe_vllm.cli import eval as eval_cli
from qe_vllm.converters.checkpoint import validate_checkpoint
from qe_vllm.converters.hf_loading import load_model, load_quantease_model
from qe_vllm.format import CheckpointFormatError


def test_good_checkpoint_validates_and_loads(good: Path) -> None:
    geometry = validate_checkpoint(good)
    assert len(geometry.shapes) == 14 and geometry.qcfg.bits == 4
    logits = load_model(good, torch.float32)(torch.tensor([[1, 5, 9]])).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loader_names_the_problem(good: Path, tmp_path: Path, case: str) -> None:
    ckpt = broken(good, tmp_path, case)
    with pytest.raises((CheckpointFormatError, FileNotFoundError)) as info:
        load_model(ckpt, torch.float32)
    message = str(info.value)
    assert "\n" not in message
    assert_message(message, case)


def test_quantease_loader_refuses_a_plain_model(tiny_llama: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="has no quantization_config, load it without"):
        load_quantease_model(tiny_llama, torch.float32)


@pytest.mark.parametrize("case", ["wrong-shape", "corrupt-header", "format-version-newer"])
def test_qe_eval_one_line_exit_2(good: Path, tmp_path: Path, capsys, case: str) -> None:
    ckpt = broken(good, tmp_path, case)
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert eval_cli.main(["--model", str(ckpt), "--data", str(text), "--seqlen", "32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qe-eval: error: "), err
    assert_message(err[0], case)
