"""Conversion on several processes with torch.distributed (``torchrun``): who does what, and the messages.

A block-by-block conversion parallelizes the way llm-compressor's distributed
GPTQ does: every process holds the block, runs its own share of the
calibration windows through it, and accumulates its share of the statistics;
the statistics are combined, each linear is solved on one process and its
solution is sent to all, so every process writes the same Ŵ back and advances
its own windows to the next block. Process 0 writes the checkpoint.

**Same bytes on any number of processes.** Floating-point addition is not
associative, so a sum of per-process partial sums is not the one-process sum.
The statistics are therefore summed in an order that does not depend on how
the windows are split (pairwise, over aligned power-of-two runs of windows:
``converters/statistics.py``), scalar sums are formed in window order from the
gathered per-window terms, and each linear's solve is the same computation on
whichever process runs it. Given the same per-process thread count (the
GEMMs' blocking, and so their rounding, may depend on it), a conversion on
``N`` processes writes the bytes the one-process conversion writes.

**Failures.** Every collective runs under the process group's timeout; a
process that dies or stops answering surfaces on the others as one
:class:`PeerFailure` naming what was being exchanged, and the resume state
holds every block all processes finished (``converters/staging.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class PeerFailure(RuntimeError):
    """Another process of the conversion died, failed, or timed out."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the conversion: its rank, the number of processes, its first window."""

    rank: int = 0
    world: int = 1
    first: int = 0
    """Index, among all calibration windows, of this process's first window."""

    @property
    def leader(self) -> bool:
        """Process 0, which writes the checkpoint and the shared resume state."""
        return self.rank == 0

    def split(self, n: int) -> tuple[Ranks, slice]:
        """This process's contiguous share of ``n`` windows (shares differ by at most one)."""
        if n < self.world:
            raise ValueError(
                f"--nsamples {n} is fewer than the {self.world} processes; every process needs a "
                f"calibration window: use --nsamples {self.world} or more, or fewer processes"
            )
        a, b = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return replace(self, first=a), slice(a, b)

    def assign(self, costs: Sequence[float]) -> list[int]:
        """The process that solves each job: largest first, to the least loaded (ties: lowest rank)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            owner[i] = min(range(self.world), key=lambda r: (load[r], r))
            load[owner[i]] += costs[i]
        return owner

    def gather(self, obj: T, what: str) -> list[T]:
        """Every process's ``obj`` (CPU tensors inside), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        _collective(lambda: dist.all_gather_object(out, obj), what, self)
        return out

    def share(self, obj: T | None, src: int, what: str) -> T:
        """Process ``src``'s ``obj`` (CPU tensors inside), on every process."""
        if self.world == 1:
            return obj  # type: ignore[return-value]
        box = [obj if self.rank == src else None]
        _collective(lambda: dist.broadcast_object_list(box, src=src), what, self)
        return box[0]

    def barrier(self, what: str) -> None:
        if self.world > 1:
            _collective(dist.barrier, what, self)


def _collective(fn: Any, what: str, ranks: Ranks) -> None:
    try:
        fn()
    except RuntimeError as e:  # gloo and NCCL failures, timeouts included (DistError is one)
        raise PeerFailure(
            f"another of the {ranks.world} processes stopped while {what} ({e}). "
            "Every block all processes finished is saved: rerun the same command with --resume"
        ) from e


def current() -> Ranks:
    """This process's :class:`Ranks`: from the initialized process group, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size())


def init_from_env(timeout_s: float) -> Ranks:
    """Join the process group that ``torchrun`` describes in the environment (nothing to join: one process).

    gloo on CPU, NCCL when CUDA is available (each process on GPU ``LOCAL_RANK``).
    ``timeout_s`` bounds every exchange, so it must exceed the longest solve of
    one linear on one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return current()


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_of(name: str, ranks: Ranks) -> str:
    """``--device`` for this process: with several processes on CUDA, its own GPU."""
    if ranks.world > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return name
