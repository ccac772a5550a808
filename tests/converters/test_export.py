"""``qe-export``: QuantEase → compressed-tensors for stock vLLM.

Fast tests check the tensors and the refusals; the slow test serves the export with the
quantease plugin excluded (``VLLM_PLUGINS=none``) and requires the same greedy tokens as
the QuantEase checkpoint served by the plugin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.env import run_script
from qe_vllm.converters.export import ExportError, export_compressed_tensors
from qe_vllm.format import unpack_codes


def convert(model: Path, out: Path, *flags: str) -> Path:
    proc = run_script("qe-convert", "--model", model, "--output", out, "--method", "rtn", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny_w4(tiny_llama: Path, tmp_path_factory) -> Path:
    """Outlier-free 4-bit asymmetric checkpoint; groups of 128 divide every input size
    (256 and 512), so the export keeps them."""
    out = tmp_path_factory.mktemp("tiny-w4") / "qe"
    return convert(tiny_llama, out, "--bits", "4", "--group-size", "128", "--outlier-fraction", "0")


def test_export_tensors_and_config(tiny_w4: Path, tmp_path: Path) -> None:
    out = tmp_path / "ct"
    proc = run_script("qe-export", "--model", tiny_w4, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "compressed-tensors" in proc.stdout and "groups of 128" in proc.stdout

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights == {**weights, "num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128}
    assert qc["ignore"] == ["lm_head"]  # untied lm_head stays 16-bit

    src, ct = load_file(str(tiny_w4 / "model.safetensors")), load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # 512 inputs, 256 outputs
    assert torch.equal(ct[f"{name}.weight_packed"], src[f"{name}.qweight"])  # codes bit for bit
    zeros = unpack_codes(ct[f"{name}.weight_zero_point"].t().contiguous(), 4, 256).t()
    assert torch.equal(zeros, src[f"{name}.qzeros"].to(torch.int32))
    assert ct[f"{name}.weight_scale"].dtype == torch.bfloat16  # the model dtype
    assert torch.equal(ct[f"{name}.weight_scale"], src[f"{name}.scales"].to(torch.bfloat16))
    assert ct[f"{name}.weight_shape"].tolist() == [256, 512]
    assert not any(k.endswith((".qweight", ".outlier_val")) for k in ct)
    assert torch.equal(ct["lm_head.weight"], src["lm_head.weight"])


def test_partial_groups_are_split(smollm2_2blocks: Path, tmp_path: Path) -> None:
    """SmolLM2's 576 inputs leave a partial last group of 64 under groups of 128: legal in
    QuantEase, not in compressed-tensors. The export uses gcd(128, 576, 1536) = 64 for every
    layer, repeating each scale and zero point."""
    ckpt = convert(smollm2_2blocks, tmp_path / "qe", "--bits", "4", "--group-size", "128", "--outlier-fraction", "0")
    report = export_compressed_tensors(ckpt, tmp_path / "ct")
    assert report.group_size == 64
    src, ct = load_file(str(ckpt / "model.safetensors")), load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, groups in (("model.layers.0.self_attn.q_proj", 9), ("model.layers.0.mlp.down_proj", 24)):
        expected = src[f"{name}.scales"].repeat_interleave(2, dim=1)[:, :groups].to(torch.bfloat16)
        assert torch.equal(ct[f"{name}.weight_scale"], expected)
        zeros = unpack_codes(ct[f"{name}.weight_zero_point"].t().contiguous(), 4, expected.shape[0]).t()
        assert torch.equal(zeros, src[f"{name}.qzeros"].to(torch.int32).repeat_interleave(2, dim=1)[:, :groups])


def test_symmetric_export_has_no_zero_points(tiny_llama: Path, tmp_path: Path) -> None:
    ckpt = convert(tiny_llama, tmp_path / "qe", "--bits", "4", "--group-size", "64", "--sym", "--outlier-fraction", "0")
    export_compressed_tensors(ckpt, tmp_path / "ct")
    ct = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert not any(k.endswith("weight_zero_point") for k in ct)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is True


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--bits", "4", "--outlier-fraction", "0.01"], "hold outliers"),
        (["--bits", "3", "--outlier-fraction", "0"], "3-bit codes"),
    ],
    ids=["outliers", "3-bit"],
)
def test_refuses_what_stock_vllm_cannot_serve(
    tiny_llama: Path, tmp_path: Path, flags: list[str], reason: str
) -> None:
    ckpt = convert(tiny_llama, tmp_path / "qe", "--group-size", "64", *flags)
    with pytest.raises(ExportError, match=reason):
        export_compressed_tensors(ckpt, tmp_path / "ct")
    proc = run_script("qe-export", "--model", ckpt, "--output", tmp_path / "ct")
    assert proc.returncode == 2 and reason in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ct").exists()


def test_refuses_existing_output(tiny_w4: Path, tmp_path: Path) -> None:
    (tmp_path / "ct").mkdir()
    proc = run_script("qe-export", "--model", tiny_w4, "--output", tmp_path / "ct")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


@pytest.mark.slow
def test_stock_vllm_serves_export_like_the_plugin(smollm2_2blocks: Path, tmp_path: Path) -> None:
    """Stock vLLM (plugin excluded) on the export vs. the plugin on the QuantEase checkpoint.

    Stock vLLM runs its ``CPUWNA16`` kernel on the compressed-tensors tensors, the plugin
    torch's int4 GEMM on its own derivation of the same codes: the same greedy tokens,
    logprobs within the bf16 drift of two GEMMs. 576-wide inputs with groups of 128
    exercise the group split.
    """
    from helpers.generation import GEMM_DRIFT_TOL, assert_same_generation, generate

    ckpt = convert(smollm2_2blocks, tmp_path / "qe", "--bits", "4", "--group-size", "128", "--outlier-fraction", "0")
    export_compressed_tensors(ckpt, tmp_path / "ct")
    plugin = generate(ckpt, tmp_path / "qe.json", quantization="quantease")
    stock = generate(tmp_path / "ct", tmp_path / "ct.json", env={"VLLM_PLUGINS": "none"}, fresh=True)
    assert_same_generation(plugin, stock, logprob_tol=GEMM_DRIFT_TOL)
