"""``qe-convert`` on bad input: one error line, exit 2, never a directory that looks complete.

Complements ``tests/qe_vllm/test_convert_cli.py`` (missing directory, offline hub id,
unsupported architecture, bad group size, missing/empty/short calibration text,
NaN weights, no CUDA, existing output, a patched writer failing mid-save) with
the remaining cases: shapes the settings do not fit, Inf weights, weights past
the float16 range, NaN/Inf *activations* during GPTQ/QuantEase calibration, a
solver that blows up, corrupt source files, and a real write failure (the process's file-size limit, so the real writer fails)
followed by ``--resume``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.env import OFFLINE_ENV, run_script
from qe_vllm.cli import convert as cli
from qe_vllm.converters import block as block_step
from qe_vllm.converters.checkpoint import load_quantized_state, partial_dir
from qe_vllm.converters.pipeline import ConvertOptions, convert

BASE = ("--bits", "4", "--group-size", "64", "--device", "cpu")
CALIB = ("--calib-data", "CALIB", "--nsamples", "4", "--seqlen", "64")


def variant(src: Path, dst: Path, edit: Callable[[Path], None]) -> Path:
    """A copy of ``src`` with ``edit`` applied to the copy."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    edit(dst)
    return dst


def edit_tensor(name: str, fn: Callable[[torch.Tensor], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        tensors = load_file(str(model / "model.safetensors"))
        fn(tensors[name])
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})

    return apply


def edit_config(model: Path, **entries: object) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(entries)
    (model / "config.json").write_text(json.dumps(config))


def _fill(value: float) -> Callable[[torch.Tensor], None]:
    return lambda t: t.fill_(value)


def _set_first(value: float) -> Callable[[torch.Tensor], None]:
    return lambda t: t.view(-1).__setitem__(0, value)


# id -> (edit of the source model or None, extra CLI args, expected part of the one error line)
CASES: dict[str, tuple[Callable[[Path], None] | None, tuple[str, ...], str]] = {
    "group-wider-than-rows": (
        None, ("--group-size", "1024"),
        "--group-size 1024 is wider than model.layers.0.self_attn.q_proj, which has 256 input features",
    ),
    "group-not-power-of-two": (None, ("--group-size", "4"), "group_size=4 must be -1"),
    "outlier-fraction-range": (None, ("--outlier-fraction", "1.5"), "--outlier-fraction 1.5 must be in [0, 1)"),
    "seqlen-past-positions": (
        None, ("--method", "gptq", *CALIB[:2], "--seqlen", "1024"),
        "--seqlen 1024 exceeds the model's max_position_embeddings=512",
    ),
    "no-samples": (
        None, ("--method", "gptq", *CALIB[:2], "--nsamples", "0"),
        "--nsamples 0 / --seqlen 2048: calibration needs at least 1 sample",
    ),
    "calib-path-missing": (None, ("--method", "gptq", "--calib-data", "/nonexistent/calib.txt"), "does not exist"),
    "calib-dir-without-txt": (None, ("--method", "gptq", "--calib-data", "EMPTYDIR"), "holds no .txt files"),
    "calib-dataset-offline": (
        None, ("--method", "quantease", "--calib-data", "no_such_dataset"), "cannot load text source 'no_such_dataset'",
    ),
    "inf-weight": (
        edit_tensor("model.layers.0.post_attention_layernorm.weight", _set_first(float("inf"))), (),
        "model.layers.0.post_attention_layernorm.weight holds NaN or Inf",
    ),
    "weight-beyond-float16": (
        edit_tensor("model.layers.1.mlp.up_proj.weight", _set_first(1e5)), (),
        "model.layers.1.mlp.up_proj holds weights up to 9.984e+04, beyond the float16 range (65504)",
    ),
    "already-quantized-source": (
        lambda m: edit_config(m, quantization_config={"quant_method": "quantease"}), (),
        "is already quantized (quantease); pass the original model to --model",
    ),
    "corrupt-source-weights": (
        lambda m: (m / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken"),
        (), "model.safetensors is not a readable safetensors file",
    ),
    "source-config-not-json": (
        lambda m: (m / "config.json").write_text("{"), (), "config.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(
    case: str, tiny_llama: Path, calib_text: Path, tmp_path: Path, capsys
) -> None:
    edit, extra, expected = CASES[case]
    model = variant(tiny_llama, tmp_path / "model", edit) if edit else tiny_llama
    (tmp_path / "emptydir").mkdir()
    subs = {"CALIB": str(calib_text), "EMPTYDIR": str(tmp_path / "emptydir")}
    out = tmp_path / "out"
    args = ["--model", str(model), "--output", str(out), "--method", "rtn", *BASE,
            *(subs.get(a, a) for a in extra)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qe-convert: error: ") and expected in err[0], err
    assert not out.exists() and not partial_dir(out).exists()


def test_unsupported_bits_through_the_api(tiny_llama: Path, tmp_path: Path) -> None:
    """The parser refuses --bits 5 (tests/qe_vllm/test_convert_cli.py); the Python API refuses it too."""
    with pytest.raises(ValueError, match=r"--bits 5 is not supported; choose one of \[2, 3, 4, 8\]"):
        convert(str(tiny_llama), tmp_path / "out", ConvertOptions(bits=5), device="cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("method", "block"), [("gptq", 0), ("quantease", 1)])
def test_nan_activations_stop_calibration(
    method: str, block: int, tiny_llama: Path, calib_text: Path, tmp_path: Path, capsys
) -> None:
    """Finite weights whose activations overflow float32: Σ = Σ x xᵀ holds Inf at that block.

    The run stops naming the block and layer; blocks finished before stay in the
    hidden partial directory (resumable), nothing looks like a checkpoint.
    """
    norm = f"model.layers.{block}.input_layernorm.weight"
    model = variant(tiny_llama, tmp_path / "model", edit_tensor(norm, _fill(1e30)))
    out = tmp_path / "out"
    args = ["--model", str(model), "--output", str(out), "--method", method, "--iters", "1", *BASE,
            "--calib-data", str(calib_text), "--nsamples", "4", "--seqlen", "64"]
    assert cli.main(args) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("qe-convert:")]  # not progress
    expected = f"the calibration activations entering model.layers.{block}.self_attn.q_proj hold NaN or Inf"
    assert len(err) == 1 and err[0].startswith("qe-convert: error: ") and expected in err[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not (partial_dir(out) / "config.json").exists()
    progress = partial_dir(out) / "_work" / "progress.json"
    assert (json.loads(progress.read_text())["next_block"] if progress.exists() else 0) == block


def test_unstorable_solution_stops_the_run(
    tiny_llama: Path, calib_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A solver that blows up (NaN) is caught before its weights reach the block or the disk."""
    real = block_step.solve

    def blown_up(w: torch.Tensor, stats, opts: ConvertOptions):
        res = real(w, stats, opts)
        if w.shape == (128, 256):  # k_proj / v_proj
            res.outliers = torch.full_like(w, float("nan"))
        return res

    monkeypatch.setattr(block_step, "solve", blown_up)
    out = tmp_path / "out"
    args = ["--model", str(tiny_llama), "--output", str(out), "--method", "gptq", *BASE,
            "--calib-data", str(calib_text), "--nsamples", "4", "--seqlen", "64"]
    assert cli.main(args) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("qe-convert:")]
    expected = "the gptq solution for model.layers.0.self_attn.k_proj cannot be stored (NaN or Inf weights"
    assert len(err) == 1 and expected in err[0], stderr
    assert not out.exists() and not (partial_dir(out) / "_work" / "block_00000.safetensors").exists()


def _limit_file_size(nbytes: int) -> Callable[[], None]:
    """preexec_fn: writes past ``nbytes`` fail with EFBIG (Python ignores SIGXFSZ, so no signal kills it)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_real_write_failure_then_resume(tiny_llama: Path, tmp_path: Path) -> None:
    """The real writer fails on the final 1.3 MB shard (limit 1 MB; per-block files are smaller)."""
    out = tmp_path / "tiny-w4"
    args = ["--model", str(tiny_llama), "--output", str(out), "--method", "rtn", *BASE,
            "--outlier-fraction", "0.015"]
    exe = str(Path(sys.executable).parent / "qe-convert")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **OFFLINE_ENV}, preexec_fn=_limit_file_size(1_000_000))
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("qe-convert:")]
    assert len(err) == 1 and "model.safetensors failed" in err[0] and "File too large" in err[0], err
    assert "check free disk space" in err[0] and "Traceback" not in proc.stderr
    assert not out.exists() and not (partial_dir(out) / "config.json").exists()

    again = run_script("qe-convert", *args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    qcfg, layers = load_quantized_state(out)
    assert len(layers) == 14 and qcfg.bits == 4
