"""Which model architectures the converter understands, as data.

The layer-wise pipeline needs to know, per architecture, four things that
transformers does not expose uniformly: where the decoder blocks live, which
linears inside a block read the same input (they share one Σ = Σ x xᵀ), which
modules run before block 0 (they must sit on the compute device while the
block-0 inputs are captured), and which keyword arguments a block needs when it
is re-run on its own (transformers 5.x passes rotary ``position_embeddings``
from the model into every Llama-family block; OPT computes positions before the
blocks and needs only the mask). Adding an architecture is one ``TABLE`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Architecture:
    """How to walk one decoder-only architecture block by block."""

    blocks: str
    """Dotted path of the ``nn.ModuleList`` of decoder blocks."""
    input_groups: tuple[tuple[str, ...], ...]
    """Linears of a block (paths relative to the block), grouped by shared input, in execution order."""
    pre_block: tuple[str, ...]
    """Modules that compute block 0's inputs (embeddings, positions, rotary)."""
    block_kwargs: tuple[str, ...]
    """Keyword arguments a block is called with, captured at block 0 and reused for every block."""
    not_converted: tuple[str, ...] = ("lm_head",)
    """Linears kept in the original precision (QuantEaseConfig.modules_to_not_convert)."""

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)


_LLAMA = Architecture(
    blocks="model.layers",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    pre_block=("model.embed_tokens", "model.rotary_emb"),
    block_kwargs=("attention_mask", "position_ids", "position_embeddings"),
)

TABLE: dict[str, Architecture] = {
    "LlamaForCausalLM": _LLAMA,  # also SmolLM/SmolLM2
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "OPTForCausalLM": Architecture(
        blocks="model.decoder.layers",
        input_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        pre_block=(
            "model.decoder.embed_tokens",
            "model.decoder.embed_positions",
            "model.decoder.project_in",
        ),
        block_kwargs=("attention_mask", "position_ids"),
    ),
}


def supported() -> list[str]:
    return sorted(TABLE)


def lookup(hf_config: dict[str, Any]) -> tuple[str, Architecture]:
    """The architecture entry for a ``config.json`` dict, or a ValueError naming what is supported."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in TABLE:
            _check_uniform_layers(hf_config, name)
            return name, TABLE[name]
    found = ", ".join(names) if names else f"none (model_type {hf_config.get('model_type')!r})"
    raise ValueError(
        f"unsupported architecture {found}; qe-convert supports {', '.join(supported())}"
    )


def _check_uniform_layers(hf_config: dict[str, Any], name: str) -> None:
    """Block-0 kwargs are reused for every block, so all blocks must use the same attention mask."""
    layer_types = hf_config.get("layer_types") or []
    if len(set(layer_types)) > 1:
        raise ValueError(
            f"{name} with mixed attention layer types {sorted(set(layer_types))} is not supported "
            "(blocks are re-run with block 0's attention mask)"
        )


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """``model.<path>``, or None when the model lacks it (e.g. OPT without ``project_in``)."""
    module: Any = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
