"""The model being converted, read from its safetensors shards one block at a time.

A 70B model does not fit in host memory, and nothing in a block-by-block conversion
needs it to: block ``i`` is solved from its own weights and its inputs alone. So the
converter never holds the whole model:

* **skeleton**: the model is built from ``config.json`` with every parameter on the
  meta device (accelerate's ``init_empty_weights``). Buffers stay real: the ones
  computed at construction (rotary frequencies, embedding scales) are not in the
  checkpoint and could not be read back from it.
* **one block at a time**: :meth:`SourceModel.loaded` reads a module's tensors from
  the shards that hold them, sets them into the skeleton, and puts the meta tensors
  back when the block is done, so its memory is freed before the next block is read.
* **checks without loading**: :meth:`SourceModel.scan` reads each tensor once, on
  its own, to refuse NaN/Inf and weights beyond float16 before any work.

Tensor names: the skeleton's names are the stored names after transformers'
renamings (``converters/hf_loading.py::renamed``); the checkpoint writer keeps the
stored names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qe_vllm.converters.checkpoint import model_dtype, open_safetensors, stored_tensors
from qe_vllm.converters.hf_loading import renamed


_SCAN_CHUNK = 1 << 22  # elements per step of SourceModel.scan


@dataclass(frozen=True)
class TensorFacts:
    """What :meth:`SourceModel.scan` found about one stored tensor."""

    shape: tuple[int, ...]
    peak: float
    """Largest magnitude (0 for a non-floating tensor)."""
    finite: bool


class SourceModel:
    """A Hugging Face model directory, read tensor by tensor."""

    def __init__(self, model_dir: Path, hf_config: dict[str, Any]) -> None:
        self.dir, self.hf_config = Path(model_dir), hf_config
        # stored name -> meta tensor (dtype, shape), and -> the shard holding it
        self.headers, self.files = stored_tensors(self.dir)
        self.dtype = model_dtype(hf_config, self.headers)
        self.names: dict[str, str] = {}  # skeleton name -> stored name

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The stored tensors ``names`` (stored names), each shard opened once."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with open_safetensors(f) as sf:
                out.update({k: sf.get_tensor(k) for k in keys})
        return out

    def scan(self) -> dict[str, TensorFacts]:
        """Every stored tensor's shape, peak magnitude and finiteness (by name), one tensor in memory at a time."""
        facts = {}
        for f in sorted(set(self.files.values())):
            with open_safetensors(f) as sf:
                for name in sf.keys():
                    facts[name] = _facts(sf.get_tensor(name))
        return dict(sorted(facts.items()))

    def skeleton(self) -> torch.nn.Module:
        """The model with its parameters on the meta device and its buffers real, in eval mode."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.dir)
        with init_empty_weights(include_buffers=False):
            net = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        net.eval()
        self.names = {
            model_name: stored
            for stored, model_name in zip(self.headers, renamed(net, dict.fromkeys(self.headers)))
        }
        return net

    @contextmanager
    def loaded(self, module: torch.nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> Iterator[None]:
        """``module`` (the skeleton's submodule at ``prefix``) holding its stored tensors, meta again after.

        Tensors are cast to the skeleton's dtype, as ``from_pretrained`` casts them.
        Names under a ``skip`` prefix (relative to ``module``) are not read. A
        parameter left on the meta device is an error naming it: the checkpoint
        lacks it.
        """
        wanted = {
            name[len(prefix):]: stored
            for name, stored in self.names.items()
            if name.startswith(prefix) and not name[len(prefix):].startswith(skip)
        }
        tensors = self.read(wanted.values())
        state = module.state_dict(keep_vars=True)
        loads = {k: tensors.pop(s).to(state[k].dtype) for k, s in wanted.items() if k in state}
        module.load_state_dict(loads, strict=False, assign=True)
        empty = [
            n for n, p in module.named_parameters() if p.is_meta and not n.startswith(skip)
        ]
        if empty:
            self.release(module, loads)
            raise ValueError(f"{self.dir}: the checkpoint has no tensor {prefix}{empty[0]}")
        try:
            yield
        finally:
            self.release(module, loads)

    @staticmethod
    def release(module: torch.nn.Module, loaded: Iterable[str]) -> None:
        """Put meta tensors back in place of the ``loaded`` entries of ``module``'s state."""
        for name in loaded:
            owner, _, leaf = name.rpartition(".")
            m = module.get_submodule(owner)
            store = m._parameters if leaf in m._parameters else m._buffers
            t = store[leaf]
            meta = torch.empty_like(t, device="meta")
            store[leaf] = torch.nn.Parameter(meta, requires_grad=False) if isinstance(t, torch.nn.Parameter) else meta


def _facts(t: torch.Tensor) -> TensorFacts:
    """Shape, peak and finiteness of ``t``, in chunks: no temporary the size of an embedding table."""
    peak, finite = 0.0, True
    if t.is_floating_point() and t.numel():
        for chunk in t.reshape(-1).split(_SCAN_CHUNK):
            peak = max(peak, float(chunk.abs().max()))
            finite = finite and bool(torch.isfinite(chunk).all())
    return TensorFacts(tuple(t.shape), peak, finite)
