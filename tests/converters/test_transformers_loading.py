"""QuantEase checkpoints in transformers: packed tensors only, and the same numbers as vLLM.

``load_quantease_model`` builds the model from its config and replaces every quantized
linear with a ``QuantEaseLinear`` that holds the checkpoint's packed tensors and runs the
exact torch path (``kernels/torch_linear.py``), the one vLLM uses with
``QE_VLLM_KERNEL=torch``. The slow test compares teacher-forced log-probabilities of
vLLM's default CPU path (torch's int4 GEMM + CSR outliers, served in float32, where the
derived 4-bit weights are the checkpoint's exactly) with transformers' on the same token ids.

``dequantize="once"`` (what ``qe-eval`` loads with) keeps each layer's dequantized weight
instead of rebuilding it per call: the logits must equal the per-call path's bit for bit, and
the kept weight must be the float64 dequantization of the packed tensors up to its dtype's
rounding (an oracle that restates the format's meaning in float64, independent of
``dequantize_weight``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.env import run_script
from helpers.layers import error_bound, random_layer
from qe_vllm.converters.hf_loading import QuantEaseLinear, load_model, load_quantease_model
from qe_vllm.format import expand_groups, sym_zero, unpack_codes
from qe_vllm.kernels.reference import reference_linear


def convert(model: Path, out: Path, *flags: str) -> Path:
    proc = run_script("qe-convert", "--model", model, "--output", out, "--method", "rtn", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_quantized_linears_hold_packed_tensors_only(tiny_llama: Path, tmp_path: Path) -> None:
    ckpt = convert(tiny_llama, tmp_path / "qe", "--bits", "3", "--group-size", "32", "--outlier-fraction", "0.02")
    model = load_quantease_model(ckpt, torch.bfloat16)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantEaseLinear)}
    assert len(linears) == 2 * 7  # every decoder linear; lm_head stays an nn.Linear
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers"))
    packed = dense = 0
    for m in linears.values():
        tensors = [t for t in m.buffers() if t is not None]
        assert not any(t.is_floating_point() and t.numel() >= m.out_features * m.in_features for t in tensors)
        assert m.qweight.dtype == torch.int32 and m.scales.dtype == torch.float16
        packed += sum(t.numel() * t.element_size() for t in tensors)
        dense += m.out_features * m.in_features * 2
    assert packed < 0.35 * dense  # 3 bits + groups of 32 + 2% outliers, vs bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantease_linear_matches_reference(dtype: torch.dtype) -> None:
    tensors, cfg = random_layer(48, 96, 4, 32, False, density=0.03, seed=2)
    layer = QuantEaseLinear(tensors, cfg, 48, 96, bias_dtype=None)
    x = torch.randn(5, 96).to(dtype)
    y_ref = reference_linear(x, tensors, cfg, 96)
    bound = error_bound(x, tensors, cfg, 96, y_ref)
    assert bool(((layer(x).float() - y_ref).abs() <= bound).all())


def float64_weight(m: QuantEaseLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid part, grid + outliers) of a layer's weight, in float64 from its packed buffers."""
    q = m.qcfg
    codes = unpack_codes(m.qweight, q.bits, m.in_features).double()
    scales = expand_groups(m.scales.double(), q.group_size, m.in_features)
    zeros = sym_zero(q.bits) if m.qzeros is None else expand_groups(
        m.qzeros.double(), q.group_size, m.in_features
    )
    grid = scales * (codes - zeros)
    full = grid.clone().view(-1).index_add_(0, m.outlier_index.long(), m.outlier_val.double())
    return grid, full.view_as(grid)


@pytest.fixture(scope="module")
def tiny_opt_ckpt(tiny_opt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OPT: linears with biases, 3 bits, asymmetric, groups of 32, 2% outliers."""
    out = tmp_path_factory.mktemp("opt-w3") / "opt-w3"
    return convert(tiny_opt, out, "--bits", "3", "--group-size", "32", "--outlier-fraction", "0.02")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["good", "tiny_opt_ckpt"])
def test_dequantize_once_same_logits_and_float64_weights(
    which: str, dtype: torch.dtype, request: pytest.FixtureRequest
) -> None:
    ckpt = request.getfixturevalue(which)
    per_call = load_quantease_model(ckpt, dtype)
    once = load_model(ckpt, dtype, dequantize="once")
    assert all(m.dense is None for m in per_call.modules() if isinstance(m, QuantEaseLinear))
    assert per_call.state_dict().keys() == once.state_dict().keys()  # the kept weight is no buffer

    layers = [m for m in once.modules() if isinstance(m, QuantEaseLinear)]
    assert layers and all("dequantize=once" in repr(m) for m in layers)
    has_outliers = has_bias = False
    for m in layers:
        assert m.dense is not None and m.dense.dtype == dtype
        assert m.dense.shape == (m.out_features, m.in_features)
        grid, w64 = float64_weight(m)
        # float32: one rounding of scale * (code - zero), one of adding the outlier;
        # bfloat16: then one rounding of that float32 value to 8 significant bits.
        bound = 2.0**-23 * (grid.abs() + w64.abs())
        if dtype == torch.bfloat16:
            bound = bound + 2.0**-8 * w64.abs()
        assert bool(((m.dense.double() - w64).abs() <= bound).all()), type(m)
        has_outliers |= m.outlier_val.numel() > 0
        has_bias |= m.bias is not None
    assert has_outliers and has_bias == (which == "tiny_opt_ckpt")

    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = per_call(input_ids=ids).logits
        b = once(input_ids=ids).logits
    assert a.dtype == dtype and torch.equal(a, b)


def test_dequantize_once_rebuilds_for_another_dtype(good: Path) -> None:
    """A call in another dtype than the kept weight's gets what the per-call path gives it."""
    once = load_quantease_model(good, torch.bfloat16, dequantize="once")
    per_call = load_quantease_model(good, torch.bfloat16)
    name, m = next((n, m) for n, m in once.named_modules() if isinstance(m, QuantEaseLinear))
    x = torch.randn(3, m.in_features)
    with torch.no_grad():
        y = m(x)
        assert m.dense.dtype == torch.float32
        assert torch.equal(y, per_call.get_submodule(name)(x))


def test_unknown_dequantize_mode_is_refused(good: Path) -> None:
    with pytest.raises(ValueError, match="dequantize='twice'"):
        load_quantease_model(good, torch.float32, dequantize="twice")


@pytest.mark.slow
def test_transformers_logprobs_match_vllm(smollm2_2blocks: Path, tmp_path: Path) -> None:
    """Teacher-forced log-probabilities: vLLM (float32) vs. transformers (float32), same ids."""
    from helpers.generation import generate

    ckpt = convert(smollm2_2blocks, tmp_path / "qe", "--bits", "4", "--group-size", "128", "--outlier-fraction", "0.01")
    served = generate(ckpt, tmp_path / "vllm.json", quantization="quantease", dtype="float32")
    model = load_quantease_model(ckpt, torch.float32)
    worst = 0.0
    for r in served:
        ids = torch.tensor([r["prompt_token_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        ours = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        worst = max(worst, float((ours - torch.tensor(r["prompt_logprobs"])).abs().max()))
    assert worst <= 2e-3, worst
