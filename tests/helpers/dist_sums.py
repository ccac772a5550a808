"""Σ of the same windows, summed by however many processes run this (for tests/converters/test_distributed.py).

``torchrun --nproc-per-node N -m tests.helpers.dist_sums OUT``: the windows are
activations of wildly different scales (so the order of the float64 additions
shows in the low bits); each process adds its share, the statistics are
combined as the converter combines them, and process 0 saves Σ and the cross term to ``OUT``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from qe_vllm.converters import distributed
from qe_vllm.converters.statistics import InputStatistics

WINDOWS, TOKENS, FEATURES = 11, 8, 16


def window(j: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(j)
    x = torch.randn(TOKENS, FEATURES, generator=g) * 10.0 ** torch.randint(-3, 4, (FEATURES,), generator=g)
    return x, x + 0.1 * torch.randn(TOKENS, FEATURES, generator=g)


def main() -> None:
    ranks = distributed.init_from_env(60)
    ranks, mine = ranks.split(WINDOWS)
    stats = InputStatistics(FEATURES, torch.device("cpu"), paired=True)
    for j in range(mine.start, mine.stop):
        stats.add(j, *window(j))
    st = stats.result("the test input", ranks)
    if ranks.leader:
        torch.save({"sigma": st.sigma, "cross": st.cross}, sys.argv[1])
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
