"""QuantEase (Behdin et al., 2023): cyclic coordinate descent on the layer objective, fixed grid.

With every weight but ``W_hat_ij`` fixed, ``f(W_hat) = tr((T - W_hat) sigma (T - W_hat)^T)``
(``T`` the target: ``W``, or ``W - H`` with outliers) is a parabola in it with minimiser

    beta_ij = W_hat_ij + [(T - W_hat) sigma]_ij / sigma_jj,

so the best grid point is the nearest one and no step increases ``f``. Rows are
independent: a column is updated for all output rows at once; the loop over
columns is sequential. A sweep is one pass over the columns.

Bookkeeping (algorithm.md §5): at the start of a sweep all ``beta`` come from
one GEMM, ``beta = W_hat + (T - W_hat) N`` with ``N = sigma diag(sigma)^-1``.
That is Algorithm 2's ``P - P_hat``, formed from the small difference
``T - W_hat`` instead of as the difference of two large products. Moving
column ``j`` by ``-step`` moves the ``beta`` of every later column ``k`` by
``N_jk * step``: the same triangular update as GPTQ's, deferred per block of
columns by :func:`lazy_block_sweep`. The GEMM gives ``f`` for free too:
``(T - W_hat) sigma = ((T - W_hat) N) diag(sigma)``.

Dead columns (:func:`dead_columns`) are not solved for: they hold the
round-to-nearest value of the target, never zero and never ``0 / 0``.
"""

from __future__ import annotations

import torch

from qe_vllm.converters.gptq import gptq, lazy_block_sweep
from qe_vllm.converters.grid import (
    GridSpec,
    column_grid,
    dequantize,
    fit_grid,
    fit_grid_mse,
    quantize,
    round_to_grid,
)
from qe_vllm.converters.objective import damped, dead_columns, exact_matmul
from qe_vllm.converters.result import QuantResult

INITS = ("w", "rtn", "gptq")


class CoordinateDescent:
    """QuantEase sweeps for one layer: ``sigma`` and the grid are fixed, the target may change.

    Computes in ``sigma``'s dtype; ``damp`` > 0 minimises the damped objective
    (a ridge pull towards the target) instead of the raw one.
    """

    def __init__(
        self,
        sigma: torch.Tensor,
        spec: GridSpec,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        *,
        damp: float = 0.0,
        block_size: int = 128,
    ) -> None:
        dead = dead_columns(sigma)
        sigma = damped(sigma, damp)
        self.col_norm = torch.where(dead, 1.0, sigma.diagonal())  # 1: no 0/0 for dead columns
        self.n = sigma / self.col_norm  # N_kj = sigma_kj / sigma_jj
        self.dead = dead.nonzero().squeeze(1)
        p = sigma.shape[0]
        self.col_scale, self.col_zero = column_grid(scales, zeros, spec, p, sigma.dtype)
        self.maxq = spec.maxq
        self.block_size = block_size

    def gradient(self, target: torch.Tensor, w_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``G = (T - W_hat) N`` and ``f(W_hat)`` from the same GEMM."""
        e = target - w_hat
        g = e @ self.n
        return g, float((g * self.col_norm * e).sum(dtype=torch.float64))

    def sweep(self, target: torch.Tensor, w_hat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """One cyclic pass over the columns from ``w_hat``; ``g = gradient(target, w_hat)[0]``."""
        beta = (w_hat + g).t().contiguous()
        beta[self.dead] = target.t()[self.dead]
        w_t = w_hat.t().clone(memory_format=torch.contiguous_format)  # never alias the caller's
        lazy_block_sweep(beta, w_t, self.n, self._round, self.block_size)
        return w_t.t()

    def on_grid(self, w_hat: torch.Tensor) -> bool:
        w_t = w_hat.t()
        return torch.equal(round_to_grid(w_t, self.col_scale, self.col_zero, self.maxq), w_t)

    def _round(self, j: int, col: torch.Tensor) -> torch.Tensor:
        return round_to_grid(col, self.col_scale[j], self.col_zero[j], self.maxq)


def stalled(history: list[float], tol: float) -> bool:
    """True once the last sweep lowered ``f`` by at most ``tol`` relative."""
    return len(history) >= 2 and history[-2] - history[-1] <= tol * history[-2]


@exact_matmul()
def coordinate_descent(
    target: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    w_hat: torch.Tensor,
    *,
    iters: int,
    tol: float = 1e-4,
    damp: float = 0.0,
    block_size: int = 128,
) -> tuple[torch.Tensor, list[float]]:
    """Up to ``iters`` sweeps from ``w_hat``, computed in ``target``'s dtype.

    Returns the last iterate and ``f`` of every iterate on the grid (the start
    counts only if it is on the grid: ``f(W) = 0`` says nothing). Stops once a
    sweep lowers ``f`` by at most ``tol`` relative.
    """
    cd = CoordinateDescent(sigma.to(target), spec, scales, zeros, damp=damp, block_size=block_size)
    w_hat = w_hat.to(target)
    g, f = cd.gradient(target, w_hat)
    history = [f] if cd.on_grid(w_hat) else []
    for _ in range(iters):
        w_hat = cd.sweep(target, w_hat, g)
        g, f = cd.gradient(target, w_hat)
        history.append(f)
        if stalled(history, tol):
            break
    return w_hat, history


def initial_point(
    w: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    grid: tuple[torch.Tensor, torch.Tensor],
    init: str,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    outlier_mask: torch.Tensor | None = None,
    outlier_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starting dense part and outliers (``None`` without ``outlier_mask``), summing to about ``w``.

    ``'w'``: ``w`` itself, the first sweep quantizes it; ``'rtn'``: the
    nearest grid point; ``'gptq'``: GPTQ on the same grid, the best start (one
    sweep from GPTQ beats ten from ``w``, algorithm.md §6). Outliers start as
    the weights under ``outlier_mask`` (GPTQ: their compensated values).
    """
    if init == "gptq":
        r = gptq(
            w, sigma, spec, damp=damp, act_order=act_order, outlier_mask=outlier_mask,
            grid=grid, outlier_dtype=outlier_dtype,
        )
        return dequantize(r.codes, r.scales, r.zeros, spec.group_size), r.outliers
    if init not in INITS:
        raise ValueError(f"init={init!r}; choose one of {list(INITS)}")
    h = None if outlier_mask is None else w.where(outlier_mask, 0.0).to(outlier_dtype).float()
    dense = w if h is None else w - h
    if init == "rtn":
        dense = dequantize(quantize(dense, *grid, spec), *grid, spec.group_size)
    return dense, h


@exact_matmul()
def quantease(
    w: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    *,
    iters: int = 5,
    init: str = "gptq",
    damp: float = 0.0,
    init_damp: float = 0.01,
    act_order: bool = False,
    tol: float = 1e-4,
    block_size: int = 128,
    mse_grid: bool = False,
    dtype: torch.dtype = torch.float32,
) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` by QuantEase with ``sigma = sum x x^T`` ``[in, in]``.

    The grid is fitted once from ``w`` (min/max, or MSE-clipped with
    ``mse_grid``) and never moves: a grid that moves mid-sweep breaks descent.
    ``damp`` damps the sweeps (default none: they minimise the true objective);
    ``init_damp`` and ``act_order`` configure the GPTQ start.
    """
    w = w.float()
    sigma = sigma.to(w.device)
    grid = (fit_grid_mse if mse_grid else fit_grid)(w, spec)
    start, _ = initial_point(w, sigma, spec, grid, init, damp=init_damp, act_order=act_order)
    w_hat, _ = coordinate_descent(
        w.to(dtype), sigma, spec, *grid, start,
        iters=iters, tol=tol, damp=damp, block_size=block_size,
    )
    return QuantResult(quantize(w_hat, *grid, spec), *grid)
