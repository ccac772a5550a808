"""QuantEase (Behdin et al., 2023): cyclic coordinate descent on the layer objective, fixed grid.

The objective (``converters/objective.py``) of the layer's iterate ``V`` is

    f(V) = tr(e Σ eᵀ) + 2 tr(W M eᵀ) + const,      e = W - V,

``M = 0`` for the classic layer-wise target and ``M ≠ 0`` for the
error-propagation one. With every weight but ``V_ij`` fixed, ``f`` is a parabola
in it, ``Σ_jj (V_ij - β_ij)² + const``, whose minimiser is

    β_ij = V_ij + [(W - V) Σ + W M]_ij / Σ_jj,

so the best grid point is the nearest one and no step increases ``f``. (With
``M = 0`` this is the paper's update; the cross term only adds the fixed
``(W M)_ij / Σ_jj``, so error propagation costs nothing per sweep.) Rows are
independent: a column is updated for all output rows at once; the loop over
columns is sequential. A sweep is one pass over the columns.

**Bookkeeping.** At the start of a sweep every ``β`` comes from one GEMM,
``β = V + G`` with ``G = (W - V) N + (W M) diag(Σ)⁻¹`` and
``N = Σ diag(Σ)⁻¹`` (Algorithm 2's ``P - P̂``, formed from the small difference
``W - V`` instead of as the difference of two large products). Moving column
``j`` by ``-step`` moves the ``β`` of every later column ``k`` by
``N_jk · step``: the triangular update GPTQ also makes, deferred per block of
columns by :func:`~qe_vllm.converters.gptq.lazy_block_sweep`. The same GEMM
gives ``f``: ``(W - V) Σ = ((W - V) N) diag(Σ)``.

**Free entries.** The outlier-aware variant (``converters/outliers.py``) marks
entries that are stored in float16 instead of on the grid; for those the
coordinate step takes ``β`` itself (rounded to float16), the exact minimiser.

**Dead columns** (:func:`~qe_vllm.converters.objective.dead_columns`) are
decoupled, as in GPTQ: their rows and columns of ``N`` are zeroed (``N_jj = 1``)
so no other column moves them and they move no other column, and their ``β``
is ``W_j`` itself: they keep the round-to-nearest value of ``W`` at any scale
of Σ, never 0 and never ``0 / 0``.
"""

from __future__ import annotations

import torch

from qe_vllm.converters.gptq import gptq, lazy_block_sweep
from qe_vllm.converters.grid import GridSpec, column_grid, dequantize, fit, quantize, round_to_grid
from qe_vllm.converters.objective import Quadratic, exact_matmul
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.result import QuantResult

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class CoordinateDescent:
    """QuantEase sweeps for one layer: ``W``, the objective and the grid are fixed.

    ``free`` (bool ``[out, in]``) marks entries stored in float16 instead of on
    the grid. Computes in ``dtype``.
    """

    def __init__(
        self,
        w: torch.Tensor,
        problem: Quadratic,
        spec: GridSpec,
        grid: tuple[torch.Tensor, torch.Tensor],
        *,
        free: torch.Tensor | None = None,
        block_size: int = 128,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        q = problem.to(w.device, dtype)
        sigma = q.sigma.clone()
        sigma[q.dead] = 0
        sigma[:, q.dead] = 0
        sigma.diagonal()[q.dead] = 1
        self.n = sigma / sigma.diagonal()  # N_kj = Σ_kj / Σ_jj
        self.weight = sigma.diagonal().masked_fill(q.dead, 0.0)  # a dead column's error is not seen
        self.w = w.to(dtype)
        self.drift = (
            None if q.shift is None else ((self.w @ q.shift) / sigma.diagonal()).masked_fill(q.dead, 0.0)
        )
        self.const = q.offset or 0.0
        self.col_scale, self.col_zero = column_grid(*grid, spec, w.shape[1], dtype)
        self.maxq = spec.maxq
        self.free = None if free is None else free.t().contiguous()
        self.block_size = block_size

    def gradient(self, v: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``G = β - V`` for every entry, and ``f(V)``, from one GEMM."""
        e = self.w - v
        g = e @ self.n
        if self.drift is not None:
            g += self.drift
            f = ((g + self.drift) * self.weight * e).sum(dtype=torch.float64)
        else:
            f = (g * self.weight * e).sum(dtype=torch.float64)
        return g, float(f) + self.const

    def sweep(self, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """One cyclic pass over the columns from ``v``; ``g = gradient(v)[0]``."""
        beta = (v + g).t().contiguous()
        v_t = v.t().clone(memory_format=torch.contiguous_format)  # never alias the caller's
        lazy_block_sweep(beta, v_t, self.n, self._round, self.block_size)
        return v_t.t()

    def on_grid(self, v: torch.Tensor) -> bool:
        v_t = v.t()
        snapped = round_to_grid(v_t, self.col_scale, self.col_zero, self.maxq)
        if self.free is not None:
            snapped = torch.where(self.free, v_t, snapped)
        return torch.equal(snapped, v_t)

    def _round(self, j: int, col: torch.Tensor) -> torch.Tensor:
        y = round_to_grid(col, self.col_scale[j], self.col_zero[j], self.maxq)
        if self.free is None:
            return y
        exact = col.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).to(col.dtype)
        return torch.where(self.free[j], exact, y)


def stalled(history: list[float], tol: float) -> bool:
    """True once the last sweep lowered ``f`` by at most ``tol`` relative."""
    return len(history) >= 2 and history[-2] - history[-1] <= tol * abs(history[-2])


@exact_matmul()
def coordinate_descent(
    cd: CoordinateDescent, v: torch.Tensor, *, iters: int, tol: float = 1e-4
) -> tuple[torch.Tensor, list[float]]:
    """Up to ``iters`` sweeps of ``cd`` from ``v``.

    Returns the last iterate and ``f`` of every iterate that is storable (the
    start counts only if it is: ``f(W) = 0`` says nothing). Stops once a sweep
    lowers ``f`` by at most ``tol`` relative.
    """
    v = v.to(cd.w)
    g, f = cd.gradient(v)
    history = [f] if cd.on_grid(v) else []
    for _ in range(iters):
        v = cd.sweep(v, g)
        g, f = cd.gradient(v)
        history.append(f)
        if stalled(history, tol):
            break
    return v, history


def initial_point(
    w: torch.Tensor,
    problem: Quadratic,
    opts: ConvertOptions,
    grid: tuple[torch.Tensor, torch.Tensor],
    free: torch.Tensor | None = None,
) -> torch.Tensor:
    """Starting iterate (grid part plus the float16 ``free`` entries), about ``w``.

    ``'w'``: ``w`` itself, the first sweep quantizes it; ``'rtn'``: the
    nearest grid point; ``'gptq'``: GPTQ on the same grid and target, the best
    start (one sweep from GPTQ beats ten from ``w``, docs/ALGORITHM.md).
    """
    if opts.init == "gptq":
        return gptq(w, problem, opts, grid=grid, outlier_mask=free).weight(opts.group_size)
    v = w if opts.init == "w" else dequantize(quantize(w, *grid, opts.spec), *grid, opts.group_size)
    return v if free is None else torch.where(free, w.half().float(), v)


def quantease(w: torch.Tensor, problem: Quadratic, opts: ConvertOptions) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` by QuantEase on ``problem``.

    The grid is fitted once from ``w`` (min/max, or MSE-clipped with
    ``opts.mse_grid``) and never moves: a grid that moves mid-sweep breaks
    descent. The sweeps minimise the objective regularized by ``opts.shrink``
    and ``opts.cd_damp``; the GPTQ start solves the unregularized one.
    """
    w = w.float()
    problem = problem.to(w.device, torch.float64)
    grid = fit(w, opts.spec, mse=opts.mse_grid)
    cd = CoordinateDescent(w, problem.regularized(opts.shrink, opts.cd_damp), opts.spec, grid)
    v, _ = coordinate_descent(cd, initial_point(w, problem, opts, grid), iters=opts.iters)
    return QuantResult(quantize(v.float(), *grid, opts.spec), *grid)
