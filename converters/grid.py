"""Uniform quantization grids: fit scales and zero points, round onto the grid.

A grid is per output row and per group of ``group_size`` consecutive input
columns (``group_size == -1``: one group spanning the whole row). Codes are
unsigned integers in ``[0, 2**bits - 1]`` and dequantize as
``scale * (code - zero)``. The grid always contains 0, so a weight taken out as
an outlier can leave exactly 0 behind in the dense part.

Scales are rounded to float16 *before* codes are computed: the checkpoint
stores float16 scales, and rounding against the stored scale keeps the
converter's dequantized weights bit-identical to what the loader rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qe_vllm.format import check_bits_and_group, dequantize, expand_groups, group_width, num_groups, sym_zero

__all__ = ["GridSpec", "fit_grid", "quantize", "dequantize"]

_FP16_TINY = 2.0**-24  # smallest positive float16: a scale can never be 0


@dataclass(frozen=True)
class GridSpec:
    """Shape of the quantization grid: bit width, group size, symmetry."""

    bits: int
    group_size: int = -1
    sym: bool = False

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group_size)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


def fit_grid(
    w: torch.Tensor, spec: GridSpec, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit min/max scales and integer zero points per row and group.

    ``exclude`` (bool, same shape as ``w``) marks weights that the grid must not
    cover, e.g. outliers stored separately; the range is fitted on the rest.
    Returns ``scales`` (float32 holding float16-representable values) and
    ``zeros`` (int32), both ``[out, G]``.
    """
    out_f, in_f = w.shape
    g, n_groups = group_width(spec.group_size, in_f), num_groups(spec.group_size, in_f)
    pad = n_groups * g - in_f
    w = w.float()
    lo_src = w if exclude is None else w.masked_fill(exclude, float("inf"))
    hi_src = w if exclude is None else w.masked_fill(exclude, float("-inf"))
    lo_src = torch.nn.functional.pad(lo_src, (0, pad), value=float("inf"))
    hi_src = torch.nn.functional.pad(hi_src, (0, pad), value=float("-inf"))
    xmin = lo_src.view(out_f, n_groups, g).amin(-1).clamp(max=0.0)
    xmax = hi_src.view(out_f, n_groups, g).amax(-1).clamp(min=0.0)
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        scales = _fp16_scale(2 * xmax / spec.maxq)
        zeros = torch.full_like(scales, sym_zero(spec.bits), dtype=torch.int32)
    else:
        scales = _fp16_scale((xmax - xmin) / spec.maxq)
        zeros = torch.round(-xmin / scales).clamp(0, spec.maxq).to(torch.int32)
    return scales, zeros


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(_FP16_TINY, 65504.0).to(torch.float16).float()


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: GridSpec
) -> torch.Tensor:
    """Round ``w`` to the nearest grid point; returns int32 codes ``[out, in]``."""
    g = spec.group_size
    s = expand_groups(scales, g, w.shape[1])
    z = expand_groups(zeros, g, w.shape[1])
    return torch.clamp(torch.round(w.float() / s) + z, 0, spec.maxq).to(torch.int32)
