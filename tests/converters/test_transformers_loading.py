"""QuantEase checkpoints in transformers: packed tensors only, and the same numbers as vLLM.

``load_quantease_model`` builds the model from its config and replaces every quantized
linear with a ``QuantEaseLinear`` that holds the checkpoint's packed tensors and runs the
exact torch path (``kernels/torch_linear.py``), the one vLLM uses with
``QE_VLLM_KERNEL=torch``. The slow test compares teacher-forced log-probabilities of
vLLM's default CPU path (torch's int4 GEMM + CSR outliers, served in float32, where the
derived 4-bit weights are the checkpoint's exactly) with transformers' on the same token ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.env import run_script
from helpers.layers import error_bound, random_layer
from qe_vllm.converters.hf_loading import QuantEaseLinear, load_quantease_model
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
