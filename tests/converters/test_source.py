"""Streaming conversion: the converter holds one block's weights at a time, reads sharded
sources, writes sharded outputs, and the bytes do not depend on how either side is sharded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qe_vllm.converters import pipeline
from qe_vllm.converters.checkpoint import INDEX, read_tensors, validate_checkpoint
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.pipeline import convert
from qe_vllm.converters.source import SourceModel


@pytest.fixture(scope="module")
def opts(calib_text: Path) -> ConvertOptions:
    return ConvertOptions(method="gptq", bits=3, group_size=64, outlier_fraction=0.01,
                          calib_data=str(calib_text), nsamples=4, seqlen=64)


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_llama`` saved again in shards of at most 200 kB (its blocks cut across files)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded-llama")
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="auto").save_pretrained(out, max_shard_size="200KB")
    for f in tiny_llama.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    assert len(list(out.glob("*.safetensors"))) > 3
    return out


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, opts: ConvertOptions, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "w3"
    convert(str(tiny_llama), out, opts, device="cpu")
    return out


def _resident_blocks(net: torch.nn.Module) -> list[int]:
    return [i for i, b in enumerate(net.model.layers) if any(not p.is_meta for p in b.parameters())]


def test_one_block_of_weights_at_a_time(tiny_llama, opts, tmp_path, monkeypatch):
    """While block i is solved, no other block and no embedding or head weight is in memory."""
    nets, seen = [], []
    skeleton, solve_block = SourceModel.skeleton, pipeline.quantize_block

    def keep(self):
        nets.append(skeleton(self))
        return nets[-1]

    def watching(block, *args):
        net = nets[0]
        seen.append((_resident_blocks(net), [n for n, p in net.named_parameters() if not p.is_meta]))
        return solve_block(block, *args)

    monkeypatch.setattr(SourceModel, "skeleton", keep)
    monkeypatch.setattr(pipeline, "quantize_block", watching)
    convert(str(tiny_llama), tmp_path / "out", opts, device="cpu")
    assert [blocks for blocks, _ in seen] == [[0], [1]]
    for i, (_, resident) in enumerate(seen):
        assert resident and all(n.startswith(f"model.layers.{i}.") for n in resident), resident
    assert _resident_blocks(nets[0]) == []  # freed after the last block too


def test_a_sharded_source_and_a_sharded_output_give_the_same_tensors(sharded_llama, reference, opts, tmp_path):
    out = tmp_path / "w3-sharded"
    convert(str(sharded_llama), out, opts, device="cpu", max_shard_bytes=150_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    got, want = read_tensors(out), read_tensors(reference)
    assert got.keys() == want.keys() == index["weight_map"].keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    validate_checkpoint(out)


def test_a_source_missing_a_block_tensor_is_refused_by_name(tiny_llama, opts, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = read_tensors(tiny_llama)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has no tensor model\.layers\.1\.post_attention_layernorm\.weight"):
        convert(str(src), tmp_path / "out", opts, device="cpu")
