"""Walking a Hugging Face decoder-only model block by block, found from the model itself.

The layer-wise pipeline (``converters/pipeline.py``) needs three things that transformers
does not name uniformly across architectures; each is discovered, not tabulated:

1. **The decoder blocks**: the ``nn.ModuleList`` whose elements are all of one of the
   model's ``_no_split_modules`` classes. transformers declares the block class there so
   that accelerate never splits a block across devices, which is exactly the unit the
   pipeline solves.
2. **What each block is called with**: every block is replaced by a stub that records
   its positional and keyword arguments and returns its input, and one window runs through
   the model. Masks, rotary embeddings and whatever else the model passes (a sliding-window
   mask on some layers and a global one on others, per-layer rotary bases) are then known
   per block, without a list of keyword names. They depend on the positions only, so one
   window gives them for all (every window has the same length and no padding).
3. **Which linears share an input**: forward pre-hooks on every ``nn.Linear`` of a block
   record the input tensor each receives. Linears that receive the *same tensor object*
   (q/k/v after the attention norm; gate/up) share one Σ, and the groups come out in
   execution order, which is the order true-sequential calibration solves them in.

What cannot be discovered stays a table: ``KEEP`` names linears that stay in full
precision. Models this walk does not fit are refused with the reason: encoder-decoders,
vision-language models, and mixtures of experts (their expert linears see a routed subset
of the tokens, which this walk does not follow).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

KEEP: tuple[str, ...] = ("lm_head",)
"""Linears outside the blocks that stay in the original precision (QuantEaseConfig.modules_to_not_convert)."""

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Layout:
    """Where a model's decoder blocks are, and the linears each holds."""

    blocks: str
    """Dotted path of the ``nn.ModuleList`` of decoder blocks."""
    linears: tuple[str, ...]
    """Every ``nn.Linear`` of a block, by path relative to it, in definition order."""
    not_converted: tuple[str, ...] = KEEP


def check_supported(hf_config: dict[str, Any]) -> None:
    """Refuse, with the reason, the kinds of model a block-by-block walk of one stack cannot convert."""
    name = ", ".join(hf_config.get("architectures") or []) or f"model_type {hf_config.get('model_type')!r}"
    if hf_config.get("is_encoder_decoder"):
        raise ValueError(f"{name} is an encoder-decoder model; qe-convert converts decoder-only models")
    if "vision_config" in hf_config or "audio_config" in hf_config:
        raise ValueError(
            f"{name} is a multimodal model; qe-convert converts text-only decoder models "
            "(for a text-only variant, convert its language model on its own)"
        )
    if any(int(hf_config.get(k) or 0) > 1 for k in _MOE_KEYS):
        raise ValueError(f"{name} is a mixture-of-experts model, which qe-convert does not support yet")


def find_blocks(model: torch.nn.Module) -> str:
    """Dotted path of the decoder blocks: the longest ``ModuleList`` of ``_no_split_modules`` blocks."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [
        (len(m), name)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) and all(type(b).__name__ in classes for b in m)
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no list of decoder blocks found (no nn.ModuleList of its "
            f"_no_split_modules {sorted(classes)}); this model cannot be walked block by block"
        )
    return max(found)[1]


def block_linears(block: torch.nn.Module) -> tuple[str, ...]:
    """Every ``nn.Linear`` inside a block, by path relative to it, in definition order."""
    return tuple(name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear))


def layout(model: torch.nn.Module) -> Layout:
    """The model's blocks and their linears; every block must hold the same linears."""
    path = find_blocks(model)
    blocks = model.get_submodule(path)
    linears = block_linears(blocks[0])
    if not linears:
        raise ValueError(
            f"{type(blocks[0]).__name__} holds no nn.Linear (GPT-2-style Conv1D layers are not "
            "supported); nothing to quantize"
        )
    for i, block in enumerate(blocks):
        if block_linears(block) != linears:
            raise ValueError(f"{path}.{i} holds other linears than {path}.0; blocks must be alike")
    return Layout(path, linears)


def output_head(model: torch.nn.Module) -> tuple[str, ...]:
    """The name of the model's output projection (empty if it declares none).

    Calibration never runs it (the walk stops at the last block), so its weights,
    the size of the embeddings, need not be read for it.
    """
    head = model.get_output_embeddings()
    return tuple(name for name, m in model.named_modules() if m is head and head is not None)


@dataclass
class BlockCall:
    """The arguments one block is called with, apart from the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Stop(Exception):
    """Raised by the last stub: the rest of the model is not needed."""


class _Stub(torch.nn.Module):
    """Stands in for a block: records how it is called and hands its input on unchanged."""

    def __init__(self, calls: list[BlockCall | None], index: int, last: bool) -> None:
        super().__init__()
        self.calls, self.index, self.last = calls, index, last
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.hidden = hidden_states
        self.calls[self.index] = BlockCall(args, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a ``BlockCall``, or what one holds) with every tensor in it on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, BlockCall):
        return BlockCall(to_device(obj.args, device), to_device(obj.kwargs, device))
    return obj


@contextmanager
def borrowed(modules: Iterable[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Run ``modules`` on ``device`` in float32 using copies; the CPU originals come back untouched.

    Swapping tensors (instead of ``module.to``) keeps the original parameters,
    in their original dtype, for the checkpoint writer, and lets the pipeline
    write quantized weights into the copy without touching the source model.
    """
    saved = []
    for root in modules:
        for m in root.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is None or t.is_meta:  # not loaded (converters/source.py): not needed here
                        continue
                    saved.append((store, name, t))
                    copy = t.detach().to(device, torch.float32 if t.is_floating_point() else t.dtype)
                    store[name] = (
                        torch.nn.Parameter(copy, requires_grad=False)
                        if isinstance(t, torch.nn.Parameter)
                        else copy
                    )
    try:
        yield
    finally:
        for store, name, t in saved:
            store[name] = t


def capture_block_inputs(
    model: torch.nn.Module, blocks_path: str, windows: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[BlockCall]]:
    """Block 0's inputs ``[n, seqlen, hidden]`` (float32, CPU) and how every block is called (CPU).

    The model runs with its blocks replaced by stubs, so only what comes before and between
    the blocks is computed (embeddings, rotary tables, masks), on ``device`` in float32.
    """
    blocks = model.get_submodule(blocks_path)
    originals = list(blocks)
    calls: list[BlockCall | None] = [None] * len(blocks)
    stubs = [_Stub(calls, i, i == len(blocks) - 1) for i in range(len(blocks))]
    acts = None
    try:
        for i, stub in enumerate(stubs):
            blocks[i] = stub
        with borrowed([model], device):  # the blocks are stubs now: only the rest moves
            for j in range(windows.shape[0]):
                try:
                    model(input_ids=windows[j : j + 1].to(device), use_cache=False)
                except _Stop:
                    pass
                hidden = stubs[0].hidden
                if acts is None:
                    acts = torch.empty(windows.shape[0], *hidden.shape[1:], dtype=torch.float32)
                acts[j] = hidden[0].float().cpu()
            found = [to_device(c, torch.device("cpu")) for c in calls]
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if any(c is None for c in found):
        raise RuntimeError(f"{type(model).__name__} did not call every block of {blocks_path}")
    return acts, found


def call_block(block: torch.nn.Module, x: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """``block``'s output hidden states for input ``x``, called as the model calls it."""
    y = block(x, *call.args, **call.kwargs)
    return y[0] if isinstance(y, tuple) else y


def run_block(block: torch.nn.Module, acts: torch.Tensor, call: BlockCall, *, into: torch.Tensor) -> None:
    """Feed every sample through ``block`` (on ``call``'s device); write the outputs to ``into``."""
    device = next(block.parameters()).device
    for j in range(acts.shape[0]):
        into[j] = call_block(block, acts[j : j + 1].to(device), call)[0].float().cpu()


def linear_groups(block: torch.nn.Module, x: torch.Tensor, call: BlockCall) -> tuple[tuple[str, ...], ...]:
    """The block's linears grouped by the input tensor they receive, in execution order.

    The recorded inputs are held until the pass ends, so no two distinct inputs can share
    an identity. A linear the pass never calls is an error: it would never be calibrated.
    """
    names = block_linears(block)
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            for tensor, group in seen:
                if tensor is args[0]:
                    group.append(name)
                    return
            seen.append((args[0], [name]))

        return record

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        call_block(block, x, call)
    finally:
        for h in handles:
            h.remove()
    groups = tuple(tuple(group) for _, group in seen)
    if missing := sorted(set(names) - {n for g in groups for n in g}):
        raise ValueError(f"the block never calls {missing}; qe-convert cannot calibrate them")
    return groups
