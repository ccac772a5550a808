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

__all__ = [
    "GridSpec",
    "column_grid",
    "dequantize",
    "fit",
    "fit_grid",
    "fit_grid_mse",
    "quantize",
    "round_to_grid",
]

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
    return _grid_from_range(*_group_range(w, spec, exclude), spec)


def fit_grid_mse(
    w: torch.Tensor,
    spec: GridSpec,
    exclude: torch.Tensor | None = None,
    *,
    norm: float = 2.4,
    steps: int = 100,
    max_shrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`fit_grid`, with each group's range shrunk to minimise ``sum |w - q(w)|**norm``.

    GPTQ's ``mse`` search: clipping the few extreme weights of a group buys a
    finer step for all the others. The candidates are the min/max range times
    ``1, 1 - 1/steps, ...``, down to just above ``1 - max_shrink`` (the full
    range included, so the error never exceeds min/max's); ``norm`` 2.4
    penalises the large errors of clipped weights more than a square would.
    """
    w = w.float()
    keep = torch.ones_like(w) if exclude is None else (~exclude).float()
    # [out, G, group] views: each candidate broadcasts its [out, G] grid without expanding it
    # (padding is 0 with keep 0: it adds nothing to any group's error).
    wg, keep = _group_view(w, spec, 0.0), _group_view(keep, spec, 0.0)

    def group_error(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        s, z = scales[..., None], zeros[..., None]
        e = torch.div(wg, s)  # round_to_grid(wg, s, z) - wg, in place: 80 candidates per layer
        e.round_().add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s).sub_(wg)
        return e.abs_().pow_(norm).mul_(keep).sum(-1)

    xmin, xmax = _group_range(w, spec, exclude)
    scales, zeros = _grid_from_range(xmin, xmax, spec)
    best = group_error(scales, zeros)
    for i in range(1, int(max_shrink * steps)):
        factor = 1.0 - i / steps
        s, z = _grid_from_range(factor * xmin, factor * xmax, spec)
        err = group_error(s, z)
        better = err < best
        best = torch.where(better, err, best)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
    return scales, zeros


def fit(
    w: torch.Tensor, spec: GridSpec, exclude: torch.Tensor | None = None, *, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid every solver uses: :func:`fit_grid_mse` with ``mse``, else :func:`fit_grid`."""
    return (fit_grid_mse if mse else fit_grid)(w, spec, exclude)


def _group_view(w: torch.Tensor, spec: GridSpec, pad_value: float) -> torch.Tensor:
    """``w`` ``[out, in]`` as ``[out, G, group]``, the last group padded with ``pad_value``."""
    out_f, in_f = w.shape
    g, n_groups = group_width(spec.group_size, in_f), num_groups(spec.group_size, in_f)
    w = torch.nn.functional.pad(w, (0, n_groups * g - in_f), value=pad_value)
    return w.view(out_f, n_groups, g)


def _group_range(
    w: torch.Tensor, spec: GridSpec, exclude: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and group: min and max of the covered weights, widened to contain 0."""
    w = w.float()
    lo_src = w if exclude is None else w.masked_fill(exclude, float("inf"))
    hi_src = w if exclude is None else w.masked_fill(exclude, float("-inf"))
    xmin = _group_view(lo_src, spec, float("inf")).amin(-1).clamp(max=0.0)
    xmax = _group_view(hi_src, spec, float("-inf")).amax(-1).clamp(min=0.0)
    return xmin, xmax


def _grid_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: GridSpec
) -> tuple[torch.Tensor, torch.Tensor]:
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


def round_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Nearest grid value ``scale * (code - zero)`` for elementwise ``scale``/``zero``.

    The same arithmetic as :func:`quantize` then :func:`dequantize`, so in
    float32 the value is bit-identical to what the checkpoint will hold, and
    :func:`quantize` recovers the code from it exactly.
    """
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def column_grid(
    scales: torch.Tensor, zeros: torch.Tensor, spec: GridSpec, in_features: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every weight, transposed to ``[in, out]`` (contiguous).

    Solvers that walk the input columns one at a time read one contiguous row
    per column this way.
    """
    scale, zero = (
        expand_groups(t, spec.group_size, in_features).t().to(dtype).contiguous()
        for t in (scales, zeros)
    )
    return scale, zero
