"""Generic model walking (``converters/walking.py``) on tiny random models of every listed architecture.

Oracles: the model's own forward pass (each block re-run from the captured calls must give
the block's output in the real forward, bit for bit: a wrong mask or rotary table on any
layer shows), the dense fake-quantized model's logits (the converted checkpoint, loaded
by the transformers loader, must match them exactly), and the groups a reader of the
modeling code would write down.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.tiny_models import ARCHITECTURES, build, config
from qe_vllm.converters import walking
from qe_vllm.converters.checkpoint import dense_reference
from qe_vllm.converters.hf_loading import load_model
from qe_vllm.converters.pipeline import ConvertOptions, convert


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request, tiny_llama, tmp_path_factory) -> tuple[Path, tuple]:
    """A random bf16 model of the architecture, saved with tiny_llama's tokenizer, and its groups."""
    out = build(request.param, tiny_llama, tmp_path_factory.mktemp(request.param))
    return out, config(request.param)[1]


def test_blocks_calls_and_groups_are_found(tiny) -> None:
    """Re-running each block from the captured calls reproduces the real forward, block by block."""
    from transformers import AutoModelForCausalLM

    path, groups = tiny
    net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lay = walking.layout(net)
    blocks = net.get_submodule(lay.blocks)
    windows = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, y: outputs.append(y[0] if isinstance(y, tuple) else y))
               for b in blocks]
    with torch.no_grad():
        net(input_ids=windows[1:], use_cache=False)
        for h in handles:
            h.remove()
        hidden, calls = walking.capture_block_inputs(net, lay.blocks, windows, torch.device("cpu"))
        x = hidden[1:]
        for i, block in enumerate(blocks):
            x = walking.call_block(block, x, calls[i])
            assert torch.equal(x, outputs[i]), f"block {i}"
        assert walking.linear_groups(blocks[0], hidden[:1], calls[0]) == groups
    assert set(lay.linears) == {n for g in groups for n in g}


def test_converts_and_loads_like_the_dense_fake_quantized_model(tiny, data_dir, tmp_path) -> None:
    path, groups = tiny
    opts = ConvertOptions(method="quantease", bits=4, group_size=32, outlier_fraction=0.01, iters=2,
                          calib_data=str(data_dir / "austen" / "northangerabbey.txt"), nsamples=4, seqlen=48)
    report = convert(str(path), tmp_path / "q", opts, device="cpu")
    errors = report.qcfg.provenance["relative_error"]
    n_blocks = len(errors) // sum(map(len, groups))
    assert len(errors) == n_blocks * sum(map(len, groups)) and all(0 < e < 0.1 for e in errors.values())
    assert all(n == round(0.01 * o * i) for (o, i), n in zip(report.shapes.values(), report.nnz.values()))
    dense_reference(report.output, tmp_path / "dense")
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q = load_model(report.output, torch.bfloat16)(ids).logits
        d = load_model(tmp_path / "dense", torch.bfloat16)(ids).logits
        o = load_model(path, torch.float32)(ids).logits
    assert torch.equal(q, d)
    assert bool(torch.isfinite(q).all()) and not torch.equal(q.float(), o)


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "encoder-decoder"),
        ({"architectures": ["Gemma3ForConditionalGeneration"], "vision_config": {}}, "multimodal"),
        ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "mixture-of-experts"),
        ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128}, "mixture-of-experts"),
    ],
)
def test_unsupported_kinds_are_refused_with_the_reason(config, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        walking.check_supported(config)


def test_conv1d_blocks_are_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    net = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no nn.Linear"):
        walking.layout(net)
