"""Round-to-nearest with largest-magnitude outliers: the baseline solver.

Outliers are taken out *before* the grid is fitted, so they do not stretch the
range of the remaining weights; the dense part holds exactly 0 there (the grid
contains 0) and the outlier keeps the original value.
"""

from __future__ import annotations

import torch

from qe_vllm.converters.grid import GridSpec, fit_grid, fit_grid_mse, quantize
from qe_vllm.converters.result import QuantResult


def largest_magnitude_mask(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``round(fraction * w.numel())`` largest-|w| entries."""
    k = round(fraction * w.numel())
    mask = torch.zeros_like(w, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(w.abs().flatten(), k, sorted=False).indices
        mask.view(-1)[idx] = True
    return mask


def rtn(
    w: torch.Tensor,
    spec: GridSpec,
    outlier_fraction: float = 0.0,
    outlier_dtype: torch.dtype = torch.float16,
    mse_grid: bool = False,
) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` by rounding to nearest, keeping the largest weights as outliers.

    ``mse_grid`` shrinks each group's range to minimise the rounding error
    (:func:`fit_grid_mse`) instead of covering min/max.
    """
    w = w.float()
    mask = largest_magnitude_mask(w, outlier_fraction)
    fit = fit_grid_mse if mse_grid else fit_grid
    scales, zeros = fit(w, spec, exclude=mask if mask.any() else None)
    codes = quantize(w.masked_fill(mask, 0.0), scales, zeros, spec)
    stored = w.to(outlier_dtype).float()  # the value the checkpoint will hold
    outliers = torch.where(mask, stored, torch.zeros_like(w)) if mask.any() else None
    return QuantResult(codes=codes, scales=scales, zeros=zeros, outliers=outliers)
