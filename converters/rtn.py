"""Round-to-nearest with largest-magnitude outliers: the baseline solver.

Outliers are taken out *before* the grid is fitted, so they do not stretch the
range of the remaining weights; the dense part holds exactly 0 there (the grid
contains 0) and the outlier keeps the original value, rounded to float16.
"""

from __future__ import annotations

import torch

from qe_vllm.converters.grid import fit, quantize
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.result import QuantResult


def largest_magnitude_mask(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``round(fraction * w.numel())`` largest-|w| entries."""
    k = round(fraction * w.numel())
    mask = torch.zeros_like(w, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(w.abs().flatten(), k, sorted=False).indices
        mask.view(-1)[idx] = True
    return mask


def rtn(w: torch.Tensor, opts: ConvertOptions) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` by rounding to nearest, keeping the largest weights as outliers.

    ``opts.mse_grid`` shrinks each group's range to minimise the rounding error
    instead of covering min/max.
    """
    w = w.float()
    mask = largest_magnitude_mask(w, opts.outlier_fraction)
    scales, zeros = fit(w, opts.spec, mask if mask.any() else None, mse=opts.mse_grid)
    codes = quantize(w.masked_fill(mask, 0.0), scales, zeros, opts.spec)
    stored = w.half().float()  # the value the checkpoint will hold
    outliers = torch.where(mask, stored, torch.zeros_like(w)) if mask.any() else None
    return QuantResult(codes=codes, scales=scales, zeros=zeros, outliers=outliers)
