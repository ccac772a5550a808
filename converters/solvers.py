"""The conversion pipeline's entry point: ``solve(method, W, sigma, spec)`` quantizes one layer."""

from __future__ import annotations

import torch

from qe_vllm.converters.gptq import gptq
from qe_vllm.converters.grid import GridSpec, fit_grid, fit_grid_mse
from qe_vllm.converters.outliers import largest, outlier_budget, quantease_outliers
from qe_vllm.converters.quantease import quantease
from qe_vllm.converters.result import QuantResult
from qe_vllm.converters.rtn import rtn

METHODS = ("rtn", "gptq", "quantease")


def solve(
    method: str,
    w: torch.Tensor,
    sigma: torch.Tensor | None,
    spec: GridSpec,
    *,
    outlier_fraction: float = 0.0,
    outlier_structure: str = "unstructured",
    iters: int = 5,
    damp: float = 0.01,
    cd_damp: float = 0.0,
    init: str = "gptq",
    act_order: bool = False,
    mse_grid: bool = False,
    seed: int | None = None,
    outlier_dtype: torch.dtype = torch.float16,
) -> QuantResult:
    """Quantize one layer ``w`` ``[out, in]`` given ``sigma = sum x x^T`` ``[in, in]``.

    ``sigma`` may be ``None`` for ``"rtn"`` only.

    * ``"rtn"``: round to nearest, the largest weights as outliers;
    * ``"gptq"``: GPTQ, with outliers the largest weights (or columns) held
      exactly while the rest compensates;
    * ``"quantease"``: ``iters`` QuantEase sweeps from ``init``; with
      ``outlier_fraction > 0`` the outlier-aware variant.

    ``damp`` is GPTQ's dampening, also for QuantEase's GPTQ start. ``cd_damp`` damps
    QuantEase's sweeps (``Σ + cd_damp · mean(diag Σ) · I``): 0 minimises the calibration
    objective itself; a positive value pulls Ŵ towards W, a ridge term that trades a
    little calibration error for less on unseen text (``benchmarks/heldout_error.py``).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {list(METHODS)}")
    budget = outlier_budget(w.shape, outlier_fraction, outlier_structure)
    if method == "rtn":
        if outlier_fraction > 0 and outlier_structure != "unstructured":
            raise ValueError("rtn keeps unstructured outliers only")
        return rtn(w, spec, outlier_fraction, outlier_dtype, mse_grid=mse_grid)
    if sigma is None:
        raise ValueError(f"method {method!r} needs sigma (calibration statistics); 'rtn' does not")
    if method == "gptq":
        mask = largest(w.float(), budget, outlier_structure) if budget else None
        grid = (fit_grid_mse if mse_grid else fit_grid)(w.float(), spec, exclude=mask)
        return gptq(
            w, sigma, spec, damp=damp, act_order=act_order, outlier_mask=mask, grid=grid,
            outlier_dtype=outlier_dtype,
        )
    options = dict(
        iters=iters, init=init, damp=cd_damp, init_damp=damp, act_order=act_order, mse_grid=mse_grid
    )
    if budget:
        return quantease_outliers(
            w, sigma, spec, outlier_fraction, structure=outlier_structure,
            outlier_dtype=outlier_dtype, seed=seed, **options,
        )
    return quantease(w, sigma, spec, **options)
