"""One decoder block (``converters/block.py``): solving from real statistics, true-sequential stages, error propagation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qe_vllm.converters.block import quantize_block
from qe_vllm.converters.calibration import calibration_windows
from qe_vllm.converters.objective import exact_matmul, layer_error, quadratic_form
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.statistics import FullPrecisionInputs, block_statistics
from qe_vllm.converters.walking import capture_block_inputs, run_block

CPU = torch.device("cpu")


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


@pytest.fixture
def cut(smollm2_2blocks, gptq_opts):
    """A fresh float32 2-block SmolLM2, its blocks' inputs on the calibration windows, and their calls."""
    net = AutoModelForCausalLM.from_pretrained(smollm2_2blocks, dtype=torch.float32)
    windows = calibration_windows(
        AutoTokenizer.from_pretrained(smollm2_2blocks),
        gptq_opts.calib_data,
        gptq_opts.nsamples,
        gptq_opts.seqlen,
        gptq_opts.seed,
    )
    with torch.no_grad():
        hidden, calls = capture_block_inputs(net, "model.layers", windows, CPU)
    return net, hidden, calls


def test_quantease_not_worse_than_its_gptq_start(cut, gptq_opts):
    """On the same Σ, one sweep from the GPTQ point lowers the true objective of every linear."""
    net, hidden, calls = cut
    block = net.model.layers[0]
    errors = {}
    with torch.no_grad(), exact_matmul():
        for opts in (gptq_opts, replace(gptq_opts, method="quantease", iters=1)):
            saved = {n: p.clone() for n, p in block.state_dict().items()}
            _, errors[opts.method] = quantize_block(
                block, opts, CPU, {"hidden": hidden.clone()}, calls[0], "model.layers.0"
            )
            block.load_state_dict(saved)
    e_g, e_q = errors["gptq"], errors["quantease"]
    assert len(e_q) == 7 and e_q.keys() == e_g.keys()
    for n, e in e_q.items():
        assert e <= e_g[n] * (1 + 1e-6), (n, e, e_g[n])
    assert sum(e_q.values()) < sum(e_g.values())


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_calibrates_on_the_quantized_predecessors(cut, gptq_opts, true_sequential):
    """o_proj's input depends only on q/k/v: true-sequential, its logged error must be the one on
    the Σ of the block with q/k/v quantized; otherwise the one on the original block's Σ."""
    opts = replace(gptq_opts, true_sequential=true_sequential)
    net, hidden, calls = cut
    block = net.model.layers[0]
    with torch.no_grad(), exact_matmul():
        original = block_statistics(block, ["self_attn.o_proj"], hidden, calls[0], CPU)
        results, errors = quantize_block(
            block, opts, CPU, {"hidden": hidden.clone()}, calls[0], "model.layers.0"
        )
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            lin = block.get_submodule(name)
            lin.weight.data = results[name].weight(opts.group_size)
        quantized = block_statistics(block, ["self_attn.o_proj"], hidden, calls[0], CPU)
    w = block.self_attn.o_proj.weight
    w_hat = results["self_attn.o_proj"].weight(opts.group_size)
    seen = quantized if true_sequential else original
    other = original if true_sequential else quantized
    e = errors["self_attn.o_proj"]
    assert e == pytest.approx(layer_error(w, w_hat, seen["self_attn.o_proj"].sigma), rel=1e-9)
    assert e != pytest.approx(layer_error(w, w_hat, other["self_attn.o_proj"].sigma), rel=1e-3)


def test_error_propagation_pairs_full_precision_inputs(cut, gptq_opts):
    """With propagation the pipeline keeps the full-precision stream: at block 1 its cross
    term pairs the unquantized model's activations with the quantized one's (they differ),
    and its output energy is ||W X_fp||² of the unquantized block's own inputs."""
    opts = replace(gptq_opts, method="quantease", propagation=1.0, iters=1)
    net, hidden, calls = cut
    with torch.no_grad(), exact_matmul():
        acts = {"hidden": hidden.clone(), "hidden_fp": hidden.clone()}
        quantize_block(net.model.layers[0], opts, CPU, acts, calls[0], "model.layers.0")
        reference = hidden.clone()
        run_block(net.model.layers[0], reference, calls[0], into=reference)  # untouched weights
        assert torch.equal(acts["hidden_fp"], reference)
        assert not torch.allclose(acts["hidden"], reference, atol=1e-3)
        block = net.model.layers[1]
        fp = FullPrecisionInputs(block, acts["hidden_fp"].clone(), calls[1], CPU, ["mlp.down_proj"], cache=False)
        st = block_statistics(block, ["mlp.down_proj"], acts["hidden"], calls[1], CPU, fp_inputs=fp)["mlp.down_proj"]
        fp_only = block_statistics(block, ["mlp.down_proj"], acts["hidden_fp"], calls[1], CPU)
    energy = quadratic_form(block.mlp.down_proj.weight.detach(), fp_only["mlp.down_proj"].sigma)
    assert fp.energy["mlp.down_proj"] == pytest.approx(energy, rel=1e-6)
    assert not torch.allclose(st.cross, st.sigma, rtol=1e-2)
