"""Resume state of a conversion: one file per finished block, inside the staging directory.

The staging directory itself (created beside the output, renamed into place
only when complete) belongs to ``converters/checkpoint.py``; this module keeps
what a resumed run needs in its ``_work`` folder. Every file is replaced
atomically and the progress marker is written last, so a run killed with
SIGKILL at any instant resumes from the last finished block, and the final
checkpoint, always assembled from these files, has the same bytes as an
uninterrupted run's.

With several processes (``converters/distributed.py``) process 0 writes the
shared files and each process its own windows' activations; the progress
marker moves on only once every process has saved its own, so a run where any
process died resumes, on the same number of processes, from the last block
they all finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qe_vllm.converters.checkpoint import header_tensor, open_safetensors, writing
from qe_vllm.converters.distributed import Ranks
from qe_vllm.converters.walking import BlockCall

# Bumped whenever the files in ``_work`` change meaning, so that a run resumed
# by a newer converter refuses the older files by name instead of misreading them.
WORK_FORMAT = 3


class WorkDir:
    """Per-block state of a conversion, inside the staging directory, written atomically."""

    def __init__(self, path: Path, fingerprint: dict[str, Any], ranks: Ranks = Ranks()) -> None:
        """Open (process 0: create) the resume state; refused if it belongs to another run's settings."""
        self.path, self.ranks = path, ranks
        if ranks.leader:
            path.mkdir(parents=True, exist_ok=True)
        run = path / "run.json"
        fingerprint = {"work_format": WORK_FORMAT, "processes": ranks.world, **fingerprint}
        if run.exists():
            previous = json.loads(run.read_text())
            if previous.get("work_format") != WORK_FORMAT:
                raise ValueError(
                    f"the interrupted conversion at {path.parent} was written by another version of qe-convert "
                    f"(resume format {previous.get('work_format', 1)}, this one reads {WORK_FORMAT}); "
                    "pass --overwrite to start over"
                )
            if previous != fingerprint:
                changed = sorted(
                    k
                    for k in fingerprint.keys() | previous.keys()
                    if previous.get(k) != fingerprint.get(k)
                )
                raise ValueError(
                    f"the interrupted conversion at {path.parent} used different settings ({', '.join(changed)}); "
                    "pass --overwrite to start over"
                )
        elif ranks.leader:
            _replace_text(run, json.dumps(fingerprint, sort_keys=True))
        else:
            raise FileNotFoundError(f"process 0 did not create {run}")

    @property
    def next_block(self) -> int:
        progress = self.path / "progress.json"
        return json.loads(progress.read_text())["next_block"] if progress.exists() else 0

    def save_calls(self, calls: list[BlockCall]) -> None:
        tmp = self.path / "block_calls.pt.tmp"
        with writing(tmp):
            torch.save([(c.args, c.kwargs) for c in calls], tmp)
        os.replace(tmp, self.path / "block_calls.pt")

    def load_acts(self, i: int) -> tuple[dict[str, torch.Tensor], list[BlockCall]]:
        """Inputs of block ``i`` (saved when block ``i - 1`` finished) and how every block is called."""
        acts = load_file(str(self._inputs_file(i)))
        calls = torch.load(self.path / "block_calls.pt", weights_only=True)
        return acts, [BlockCall(args, kwargs) for args, kwargs in calls]

    def save_block(
        self,
        i: int,
        tensors: dict[str, torch.Tensor],
        errors: dict[str, float | None],
        acts: dict[str, torch.Tensor] | None,
    ) -> None:
        """Block ``i`` done: its tensors, the next block's inputs, the progress marker, cleanup.

        The inputs are named by the block they feed, so a kill between any two
        steps leaves the marker pointing at a block whose inputs are on disk
        (never at block ``i`` with block ``i``'s *outputs* in place of its inputs).
        """
        if self.ranks.leader:
            _save_atomic(self._block_file(i), tensors, {"errors": json.dumps(errors, sort_keys=True)})
        if acts is not None:
            _save_atomic(self._inputs_file(i + 1), acts, {})
        self.ranks.barrier(f"saving the resume state of block {i}")
        if self.ranks.leader:
            _replace_text(self.path / "progress.json", json.dumps({"next_block": i + 1}))
        self.ranks.barrier(f"saving the resume state of block {i}")
        self._inputs_file(i).unlink(missing_ok=True)

    def block_contents(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
        """Block ``i``'s saved tensors as meta tensors (dtype and shape only) and its layer errors."""
        path = self._block_file(i)
        with open_safetensors(path) as f:
            return {k: header_tensor(f, k, path) for k in f.keys()}, json.loads(f.metadata()["errors"])

    def read_block(self, i: int, names: list[str]) -> dict[str, torch.Tensor]:
        with open_safetensors(self._block_file(i)) as f:
            return {k: f.get_tensor(k) for k in names}

    def _block_file(self, i: int) -> Path:
        return self.path / f"block_{i:05d}.safetensors"

    def _inputs_file(self, i: int) -> Path:
        """Block ``i``'s inputs on this process's windows."""
        return self.path / (f"inputs_{i:05d}.safetensors" if self.ranks.world == 1 else f"inputs_{i:05d}.rank{self.ranks.rank}.safetensors")


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
