"""Checkpoint writing and reading: round trip, validation, tied embeddings, dense oracle, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from qe_vllm.converters import checkpoint
from qe_vllm.converters.checkpoint import (
    dense_reference,
    load_quantized_state,
    read_tensors,
    staged_output,
    write_model_dir,
)
from qe_vllm.converters.hf_loading import load_model
from qe_vllm.converters.pipeline import ConvertOptions, convert
from qe_vllm.converters.rtn import rtn
from qe_vllm.format import CheckpointFormatError, QZEROS, QuantEaseConfig, dense_weight

LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

RTN_W4 = ConvertOptions(method="rtn", bits=4, group_size=64, outlier_fraction=0.015)


def _keys(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def tiny_w4(tiny_llama, tmp_path_factory):
    return convert(
        str(tiny_llama), tmp_path_factory.mktemp("ckpt") / "tiny-w4", RTN_W4, device="cpu"
    ).output


@pytest.fixture(scope="module")
def tiny_w4_dense(tiny_w4, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "tiny-w4-dense"
    dense_reference(tiny_w4, out)
    return out


def test_round_trip_matches_solver_output(tiny_llama, tiny_w4):
    qcfg, layers = load_quantized_state(tiny_w4)
    assert qcfg.bits == 4 and qcfg.group_size == 64 and not qcfg.sym
    assert qcfg.provenance["method"] == "rtn" and qcfg.provenance["options"]["calib_data"] is None
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_LINEARS]
    assert sorted(layers) == sorted(names)
    original = read_tensors(tiny_llama)
    for (
        name
    ) in names:  # what is on disk is exactly what the solver produced for the original weight
        expected = rtn(original[f"{name}.weight"].float(), RTN_W4).to_tensors(qcfg)
        assert set(layers[name]) == set(expected)
        for k, v in expected.items():
            assert torch.equal(layers[name][k], v), (name, k)
    # GQA: k/v projections are narrower than q
    assert layers["model.layers.0.self_attn.k_proj"]["qweight"].shape[0] == 128
    assert layers["model.layers.0.self_attn.q_proj"]["qweight"].shape[0] == 256


def test_unquantized_tensors_and_side_files_kept(tiny_llama, tiny_w4):
    original = read_tensors(tiny_llama)
    stored = read_tensors(tiny_w4)
    for k, v in original.items():
        if k.endswith("_proj.weight"):
            assert k not in stored
        else:  # embeddings, norms, untied lm_head: as in the original
            assert stored[k].dtype == v.dtype and torch.equal(stored[k], v), k
    assert "lm_head.weight" in stored
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (tiny_w4 / f).read_bytes() == (tiny_llama / f).read_bytes()
    config = json.loads((tiny_w4 / "config.json").read_text())
    assert QuantEaseConfig.from_dict(config["quantization_config"]).outlier_fraction == 0.015
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_tied_embeddings_not_duplicated(smollm2_2blocks, tmp_path):
    out = convert(str(smollm2_2blocks), tmp_path / "cut-w4", RTN_W4, device="cpu").output
    assert "lm_head.weight" not in _keys(out)
    assert "model.embed_tokens.weight" in _keys(out)
    model = load_model(out, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_validation_names_the_broken_layer(tiny_w4, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = read_tensors(tiny_w4)
    del tensors[f"model.layers.1.mlp.up_proj.{QZEROS}"]
    write_model_dir(bad, tensors, json.loads((tiny_w4 / "config.json").read_text()), tiny_w4)
    with pytest.raises(CheckpointFormatError, match="model.layers.1.mlp.up_proj"):
        load_quantized_state(bad)


def test_dense_reference_holds_effective_weights(tiny_w4, tiny_w4_dense):
    qcfg, layers = load_quantized_state(tiny_w4)
    dense = read_tensors(tiny_w4_dense)
    name = "model.layers.0.mlp.down_proj"
    expected = dense_weight(layers[name], qcfg, 512).to(torch.bfloat16)
    assert torch.equal(dense[f"{name}.weight"], expected)
    assert "quantization_config" not in json.loads((tiny_w4_dense / "config.json").read_text())


def test_packed_model_equals_dense_oracle(tiny_w4, tiny_w4_dense):
    """bf16: the on-the-fly dequantized layer computes exactly what the dense oracle computes."""
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = load_model(tiny_w4, torch.bfloat16)(ids).logits
        d = load_model(tiny_w4_dense, torch.bfloat16)(ids).logits
    assert torch.equal(q, d)


def test_sharded_write_reads_back(tiny_w4, tmp_path):
    tensors = read_tensors(tiny_w4)
    config = json.loads((tiny_w4 / "config.json").read_text())
    write_model_dir(tmp_path, tensors, config, tiny_w4, max_shard_bytes=400_000)
    index = json.loads((tmp_path / checkpoint.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(tensors)
    back = read_tensors(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    load_quantized_state(tmp_path)


def test_staged_output_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out, overwrite=False) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")
    assert list(tmp_path.iterdir()) == []
    with staged_output(out, overwrite=False) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(FileExistsError), staged_output(out, overwrite=False):
        pass
    with staged_output(out, overwrite=True) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["b"]
