"""Calibrated layer-wise conversion (``converters/pipeline.py`` driving ``converters/block.py``): GPTQ/QuantEase on real weights, true-sequential, error propagation, resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qe_vllm.converters import pipeline
from qe_vllm.converters.walking import capture_block_inputs, run_block
from qe_vllm.converters.calibration import calibration_windows, load_text
from qe_vllm.converters.block import quantize_block
from qe_vllm.converters.checkpoint import load_quantized_state, partial_dir
from qe_vllm.converters.objective import exact_matmul, quadratic_form
from qe_vllm.converters.pipeline import ConvertOptions, convert


@pytest.fixture(scope="module")
def gptq_opts(data_dir) -> ConvertOptions:
    return ConvertOptions(
        method="gptq",
        bits=4,
        group_size=128,
        calib_data=str(data_dir / "austen" / "northangerabbey.txt"),
        nsamples=4,
        seqlen=128,
        seed=3,
        true_sequential=False,
        propagation=0.0,
        shrink=0.0,
        mse_grid=False,
    )


@pytest.fixture(scope="module")
def gptq_cut(smollm2_2blocks, gptq_opts, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "cut-gptq"
    return convert(str(smollm2_2blocks), out, gptq_opts, device="cpu")


def test_gptq_on_real_weights(gptq_cut):
    qcfg, layers = load_quantized_state(gptq_cut.output)
    prov = qcfg.provenance
    assert prov["method"] == "gptq" and prov["options"]["nsamples"] == 4 and prov["options"]["seed"] == 3
    errors = prov["relative_error"]
    assert set(errors) == set(layers) and len(layers) == 14
    assert all(0 < e < 0.05 for e in errors.values()), errors  # 4-bit g128 on real weights: small
    assert all(t["outlier_col_idx"].numel() == 0 for t in layers.values())


def test_quantease_not_worse_than_its_gptq_start(smollm2_2blocks, gptq_opts, gptq_cut):
    """Block 0 sees the same Σ as in the GPTQ run; QuantEase descends from the GPTQ point on the true objective."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opts = replace(gptq_opts, method="quantease", iters=1)
    net = AutoModelForCausalLM.from_pretrained(smollm2_2blocks, dtype="auto")
    windows = calibration_windows(
        AutoTokenizer.from_pretrained(smollm2_2blocks),
        opts.calib_data,
        opts.nsamples,
        opts.seqlen,
        opts.seed,
    )
    cpu = torch.device("cpu")
    with torch.no_grad(), exact_matmul():
        hidden, calls = capture_block_inputs(net, "model.layers", windows, cpu)
        _, e_q = quantize_block(
            net.model.layers[0], opts, cpu, {"hidden": hidden}, calls[0], "model.layers.0"
        )
    e_g = gptq_cut.qcfg.provenance["relative_error"]
    assert len(e_q) == 7
    for n, e in e_q.items():
        assert e <= e_g[f"model.layers.0.{n}"] * (1 + 1e-6), (n, e, e_g[f"model.layers.0.{n}"])
    assert sum(e_q.values()) < sum(e_g[f"model.layers.0.{n}"] for n in e_q)


def test_resume_is_byte_identical(smollm2_2blocks, gptq_opts, gptq_cut, tmp_path, monkeypatch):
    out = tmp_path / "cut-gptq"
    real = pipeline.quantize_block
    calls = []

    def interrupted(block, opts, device, acts, call, label):
        if label.endswith(".1"):
            raise KeyboardInterrupt
        return real(block, opts, device, acts, call, label)

    monkeypatch.setattr(pipeline, "quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(str(smollm2_2blocks), out, gptq_opts, device="cpu")
    assert not out.exists()
    assert json.loads((partial_dir(out) / "_work" / "progress.json").read_text()) == {
        "next_block": 1
    }

    with pytest.raises(ValueError, match="different settings"):
        convert(str(smollm2_2blocks), out, replace(gptq_opts, seed=4), device="cpu", resume=True)

    def counting(block, opts, device, acts, call, label):
        calls.append(label)
        return real(block, opts, device, acts, call, label)

    monkeypatch.setattr(pipeline, "quantize_block", counting)
    convert(str(smollm2_2blocks), out, gptq_opts, device="cpu", resume=True)
    assert calls == ["model.layers.1"]  # block 0 came from the saved state
    assert not partial_dir(out).exists()
    reference = gptq_cut.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for f in reference.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_calibrates_on_the_quantized_predecessors(smollm2_2blocks, gptq_opts, true_sequential):
    """o_proj's input depends only on q/k/v: true-sequential, its logged error must be the one on
    the Σ of the block with q/k/v quantized; otherwise the one on the original block's Σ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qe_vllm.converters.objective import layer_error
    from qe_vllm.converters.statistics import block_statistics

    opts = replace(gptq_opts, true_sequential=true_sequential)
    net = AutoModelForCausalLM.from_pretrained(smollm2_2blocks, dtype=torch.float32)
    windows = calibration_windows(
        AutoTokenizer.from_pretrained(smollm2_2blocks), opts.calib_data, 4, 128, 3
    )
    cpu = torch.device("cpu")
    block = net.model.layers[0]
    with torch.no_grad(), exact_matmul():
        hidden, calls = capture_block_inputs(net, "model.layers", windows, cpu)
        original = block_statistics(block, ["self_attn.o_proj"], hidden, calls[0], cpu)
        results, errors = quantize_block(
            block, opts, cpu, {"hidden": hidden.clone()}, calls[0], "model.layers.0"
        )
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            lin = block.get_submodule(name)
            lin.weight.data = results[name].weight(opts.group_size)
        quantized = block_statistics(block, ["self_attn.o_proj"], hidden, calls[0], cpu)
    w = block.self_attn.o_proj.weight
    w_hat = results["self_attn.o_proj"].weight(opts.group_size)
    seen = quantized if true_sequential else original
    other = original if true_sequential else quantized
    e = errors["self_attn.o_proj"]
    assert e == pytest.approx(layer_error(w, w_hat, seen["self_attn.o_proj"].sigma), rel=1e-9)
    assert e != pytest.approx(layer_error(w, w_hat, other["self_attn.o_proj"].sigma), rel=1e-3)


def test_error_propagation_pairs_full_precision_inputs(smollm2_2blocks, gptq_opts):
    """With propagation the pipeline keeps the full-precision stream: at block 1 its cross
    term pairs the unquantized model's activations with the quantized one's (they differ),
    and its output energy is ||W X_fp||² of the unquantized block's own inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qe_vllm.converters.statistics import FullPrecisionInputs, block_statistics

    opts = replace(gptq_opts, method="quantease", propagation=1.0, iters=1)
    net = AutoModelForCausalLM.from_pretrained(smollm2_2blocks, dtype=torch.float32)
    windows = calibration_windows(
        AutoTokenizer.from_pretrained(smollm2_2blocks), opts.calib_data, 4, 128, 3
    )
    cpu = torch.device("cpu")
    with torch.no_grad(), exact_matmul():
        hidden, calls = capture_block_inputs(net, "model.layers", windows, cpu)
        acts = {"hidden": hidden.clone(), "hidden_fp": hidden.clone()}
        quantize_block(net.model.layers[0], opts, cpu, acts, calls[0], "model.layers.0")
        reference = hidden.clone()
        run_block(net.model.layers[0], reference, calls[0], into=reference)  # untouched weights
        assert torch.equal(acts["hidden_fp"], reference)
        assert not torch.allclose(acts["hidden"], reference, atol=1e-3)
        block = net.model.layers[1]
        fp = FullPrecisionInputs(block, acts["hidden_fp"].clone(), calls[1], cpu, ["mlp.down_proj"], cache=False)
        st = block_statistics(block, ["mlp.down_proj"], acts["hidden"], calls[1], cpu, fp_inputs=fp)["mlp.down_proj"]
        fp_only = block_statistics(block, ["mlp.down_proj"], acts["hidden_fp"], calls[1], cpu)
    energy = quadratic_form(block.mlp.down_proj.weight.detach(), fp_only["mlp.down_proj"].sigma)
    assert fp.energy["mlp.down_proj"] == pytest.approx(energy, rel=1e-6)
    assert not torch.allclose(st.cross, st.sigma, rtol=1e-2)


def test_calibration_sources_and_seeded_windows(smollm2_2blocks, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_2blocks)
    rows = [f"Sentence number {i} of a small calibration corpus." for i in range(200)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    datasets.Dataset.from_dict({"id": list(range(200)), "text": rows}).to_parquet(
        tmp_path / "rows.parquet"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("\n\n".join(rows[100:]))
    (tmp_path / "docs" / "a.txt").write_text("\n\n".join(rows[:100]))
    joined = "\n\n".join(rows)
    for source in ("rows.jsonl", "rows.parquet", "docs"):
        assert load_text(str(tmp_path / source)) == joined, source

    a = calibration_windows(tok, str(tmp_path / "docs"), 5, 32, seed=7)
    assert a.shape == (5, 32) and torch.equal(
        a, calibration_windows(tok, str(tmp_path / "docs"), 5, 32, seed=7)
    )
    assert not torch.equal(a, calibration_windows(tok, str(tmp_path / "docs"), 5, 32, seed=8))
    with pytest.raises(ValueError, match="too few"):
        calibration_windows(tok, str(tmp_path / "docs"), 5, 100_000, seed=7)
    with pytest.raises(ValueError, match="cannot load text source"):
        load_text("no_such_dataset_name")
