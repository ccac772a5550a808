"""Tiny random decoder-only models of every architecture the converter walks, built from configs.

For architecture coverage only (random weights say nothing about quality). Each model is
saved in bf16 (heads of at least 32, the smallest vLLM's CPU attention takes) with the tokenizer of ``tests/conftest.py``'s ``tiny_llama`` (vocabulary 512),
so the same prompts run on all of them. Used by tests/converters/test_walking.py and
tests/qe_vllm/test_vllm_method.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA_GROUPS = (QKV, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt_neox"]


def config(name: str):
    """The transformers config of the tiny ``name`` model, and its linears grouped by shared input."""
    import transformers as t

    if name == "llama":
        return t.LlamaConfig(**SMALL), LLAMA_GROUPS
    if name == "mistral":
        return t.MistralConfig(**SMALL, sliding_window=16), LLAMA_GROUPS
    if name == "qwen2":
        return t.Qwen2Config(**SMALL), LLAMA_GROUPS
    if name == "qwen3":  # q/k norms between the projections and attention
        return t.Qwen3Config(**SMALL, head_dim=32), LLAMA_GROUPS
    if name == "gemma2":  # soft-capping, alternating sliding/global layers
        return t.Gemma2Config(**SMALL, head_dim=32, sliding_window=16), LLAMA_GROUPS
    if name == "gemma3":  # text model; per-layer-type masks and rotary bases, tied embeddings
        cfg = t.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 3}, head_dim=32, sliding_window=16,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        return cfg, LLAMA_GROUPS
    if name == "phi3":  # fused qkv_proj and gate_up_proj
        return t.Phi3Config(**{**SMALL, "num_attention_heads": 2, "num_key_value_heads": 1}), (("self_attn.qkv_proj",), ("self_attn.o_proj",),
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


def build(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """Save a random bf16 ``name`` model (seed 0) with ``tokenizer_dir``'s tokenizer files at ``out``."""
    from transformers import AutoModelForCausalLM

    cfg, _ = config(name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out
