"""``qe-convert`` as a user runs it: help, summary, refusal to clobber, atomic write, clear errors."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import fields, replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.env import run_script
from qe_vllm.cli import convert as cli
from qe_vllm.converters import checkpoint
from qe_vllm.converters.calibration import describe
from qe_vllm.converters.checkpoint import load_quantized_state, partial_dir
from qe_vllm.converters.gptq import gptq
from qe_vllm.converters.grid import GridSpec, fit_grid_mse
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.solvers import solve

RTN_ARGS = (
    "--method",
    "rtn",
    "--bits",
    "4",
    "--group-size",
    "64",
    "--outlier-fraction",
    "0.015",
    "--device",
    "cpu",
)


def test_help_explains_usage():
    r = run_script("qe-convert", "--help", timeout=60)
    assert r.returncode == 0
    for word in (
        "--calib-data",
        "--outlier-fraction",
        "--resume",
        "examples:",
        "qe-convert --model",
    ):
        assert word in r.stdout


def test_rtn_conversion_prints_summary_and_refuses_existing_output(tiny_llama, tmp_path):
    out = tmp_path / "tiny-w4"
    r = run_script("qe-convert", "--model", tiny_llama, "--output", out, *RTN_ARGS)
    assert r.returncode == 0, r.stderr
    for word in ("bits/weight", "effective", "outliers", "size on disk", "original", "time"):
        assert word in r.stdout
    qcfg, layers = load_quantized_state(out)
    assert len(layers) == 14 and qcfg.provenance["method"] == "rtn"

    again = run_script("qe-convert", "--model", tiny_llama, "--output", out, *RTN_ARGS)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"qe-convert: error: output directory {out} already exists; pass --overwrite to replace it"
    ]
    assert (
        run_script(
            "qe-convert", "--model", tiny_llama, "--output", out, *RTN_ARGS, "--overwrite"
        ).returncode
        == 0
    )


def test_failed_write_leaves_nothing_that_looks_complete(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny-w4"
    real_write = checkpoint._write_shard

    def failing_write(path, tensors):
        path.write_bytes(b"\0" * 1000)  # half-written shard
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint, "_write_shard", failing_write)
    assert cli.main(["--model", str(tiny_llama), "--output", str(out), *RTN_ARGS]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert leftovers == [partial_dir(out)] and not (partial_dir(out) / "config.json").exists()

    monkeypatch.setattr(checkpoint, "_write_shard", real_write)
    assert (
        cli.main(["--model", str(tiny_llama), "--output", str(out), *RTN_ARGS]) == 2
    )  # needs --resume
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["--model", str(tiny_llama), "--output", str(out), *RTN_ARGS, "--resume"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    load_quantized_state(out)


def _variant(src, dst, config_edit=None, tensor_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    if tensor_edit:
        tensors = load_file(str(dst / "model.safetensors"))
        tensor_edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _nan(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("missing dir", ["--model", "/nonexistent/model"], "does not exist"),
        ("hub id offline", ["--model", "no-such-org/no-such-model"], "could not be fetched"),
        ("encoder-decoder", ["--arch-variant", "encdec"], "is an encoder-decoder model"),
        ("mixture of experts", ["--arch-variant", "moe"], "is a mixture-of-experts model"),
        ("bad group", ["--group-size", "100"], "group_size=100"),
        ("chat format on plain text", ["--method", "gptq", "--calib-data", "SHORT", "--calib-format", "chat"],
         "--calib-format chat needs conversations"),
        ("named chat data as text", ["--method", "quantease", "--calib-data", "ultrachat"], "holds chat data: pass --calib-format chat"),
        ("negative damping", ["--cd-damp", "-0.1"], "dampening cannot be negative"),
        ("shrink out of range", ["--shrink", "1.0"], "--shrink 1.0 must be in [0, 1)"),
        ("propagation out of range", ["--propagation", "2"], "--propagation 2.0 must be in [0, 1]"),
        ("empty calib", ["--method", "gptq", "--calib-data", "EMPTY"], "is empty"),
        ("short calib", ["--method", "gptq", "--calib-data", "SHORT", "--seqlen", "64"], "too few"),
        ("nan weights", ["--arch-variant", "nan"], "NaN or Inf"),
        ("no cuda", ["--device", "cuda"], "no CUDA device"),
    ],
)
def test_errors_are_one_line_exit_2(case, extra, message, tiny_llama, tmp_path, capsys):
    model = tiny_llama
    if "--arch-variant" in extra:
        kind = extra[extra.index("--arch-variant") + 1]
        extra = []
        edit = {
            "encdec": {"config_edit": lambda c: c.update(is_encoder_decoder=True)},
            "moe": {"config_edit": lambda c: c.update(num_local_experts=8)},
            "nan": {"tensor_edit": _nan},
        }[kind]
        model = _variant(tiny_llama, tmp_path / kind, **edit)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("a few words only")
    extra = [
        {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}.get(a, a)
        for a in extra
    ]
    base = ["--model", str(model), "--output", str(tmp_path / "out"), *RTN_ARGS]
    assert cli.main(base + extra) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qe-convert: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_bad_bits_rejected_by_parser(tiny_llama, tmp_path):
    r = run_script(
        "qe-convert", "--model", tiny_llama, "--output", tmp_path / "o", "--bits", "5", timeout=60
    )
    assert r.returncode == 2 and "invalid choice: 5" in r.stderr and "Traceback" not in r.stderr


def test_act_order_and_mse_grid_reach_the_solver_and_the_provenance(tiny_llama, data_dir, tmp_path):
    """The flags change the solution exactly as the solver's own options do, and are recorded."""
    out = tmp_path / "gptq-ao-mse"
    args = ["--method", "gptq", "--bits", "3", "--group-size", "32", "--device", "cpu",
            "--calib-data", str(data_dir / "austen" / "northangerabbey.txt"),
            "--nsamples", "2", "--seqlen", "64"]
    assert cli.main(["--model", str(tiny_llama), "--output", str(out), *args,
                     "--act-order", "--mse"]) == 0
    qcfg, _ = load_quantized_state(out)
    options = qcfg.provenance["options"]
    assert options["act_order"] is True and options["mse_grid"] is True
    assert set(options) == {f.name for f in fields(ConvertOptions)}  # every option is recorded

    opts = ConvertOptions(method="gptq", bits=3, group_size=32, act_order=True, mse_grid=True)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 64, generator=g), torch.randn(64, 256, generator=g)
    x[::7] *= 10  # uneven activation energy: act-order picks another column order
    sigma = x @ x.T
    got = solve(w, sigma, opts)
    want = gptq(w, sigma, opts, grid=fit_grid_mse(w, GridSpec(3, 32)))
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    assert not torch.equal(got.codes, solve(w, sigma, replace(opts, act_order=False, mse_grid=False)).codes)


def test_quantease_on_the_bundled_corpus_is_the_default(tiny_llama, tmp_path, caplog):
    """No --method and no --calib-data: QuantEase on the bundled corpus, offline, and it says so."""
    out = tmp_path / "out"
    args = ["--model", str(tiny_llama), "--output", str(out), "--device", "cpu", "--nsamples", "2",
            "--seqlen", "64"]
    with caplog.at_level(logging.INFO):
        assert cli.main(args) == 0
    qcfg, _ = load_quantized_state(out)
    assert qcfg.provenance["method"] == "quantease"
    assert qcfg.provenance["options"] == {
        **{f.name: f.default for f in fields(ConvertOptions)},
        "calib_data": describe(None),
        "nsamples": 2,
        "seqlen": 64,
    }
    said = qcfg.provenance["calibration"]
    assert said.startswith("calibration: 2 windows x 64 tokens (128 tokens) from bundled corpus")
    assert said in caplog.text
