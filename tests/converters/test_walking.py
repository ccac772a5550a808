"""Generic model walking (``converters/walking.py``) on tiny random models of every listed architecture.

Oracles: the model's own forward pass (each block re-run from the captured calls must give
the block's output in the real forward, bit for bit: a wrong mask or rotary table on any
layer shows), the dense fake-quantized model's logits (the converted checkpoint, loaded
by the transformers loader, must match them exactly), and the groups a reader of the
modeling code would write down.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qe_vllm.converters import walking
from qe_vllm.converters.checkpoint import dense_reference
from qe_vllm.converters.hf_loading import load_model
from qe_vllm.converters.pipeline import ConvertOptions, convert

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA_GROUPS = (QKV, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _config(name: str):
    import transformers as t

    if name == "llama":
        return t.LlamaConfig(**SMALL), LLAMA_GROUPS
    if name == "mistral":
        return t.MistralConfig(**SMALL, sliding_window=16), LLAMA_GROUPS
    if name == "qwen2":
        return t.Qwen2Config(**SMALL), LLAMA_GROUPS
    if name == "qwen3":  # q/k norms between the projections and attention
        return t.Qwen3Config(**SMALL, head_dim=16), LLAMA_GROUPS
    if name == "gemma2":  # soft-capping, alternating sliding/global layers
        return t.Gemma2Config(**SMALL, head_dim=16, sliding_window=16), LLAMA_GROUPS
    if name == "gemma3":  # text model; per-layer-type masks and rotary bases, tied embeddings
        cfg = t.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 3}, head_dim=16, sliding_window=16,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        return cfg, LLAMA_GROUPS
    if name == "phi3":  # fused qkv_proj and gate_up_proj
        return t.Phi3Config(**SMALL), (("self_attn.qkv_proj",), ("self_attn.o_proj",),
                                       ("mlp.gate_up_proj",), ("mlp.down_proj",))
    if name == "opt":
        cfg = t.OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return cfg, (QKV, ("self_attn.out_proj",), ("fc1",), ("fc2",))
    if name == "gpt_neox":  # fused query_key_value; attention and MLP read the same block input
        cfg = t.GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=256, bos_token_id=1,
                              eos_token_id=2, pad_token_id=0)
        return cfg, (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                     ("mlp.dense_4h_to_h",))
    raise KeyError(name)


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt_neox"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request, tiny_llama, tmp_path_factory) -> tuple[Path, tuple]:
    """A random bf16 model of the architecture, saved with tiny_llama's tokenizer, and its groups."""
    from transformers import AutoModelForCausalLM

    cfg, groups = _config(request.param)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out, groups


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
