"""GPTQ (Frantar et al., 2022): the baseline solver and QuantEase's starting point.

Columns are quantized left to right; each column's rounding error is pushed
onto the columns not yet quantized so that they can compensate, which is OBS
with the inverse Hessian ``H^-1 = (sigma + damping)^-1`` read from its upper
Cholesky factor ``U`` (row ``j`` of ``U``, divided by ``U_jj``, is how much of
column ``j``'s error each later column absorbs).

Unlike the reference implementation, the grid is fitted once, up front, from
the original ``W`` ("static groups", also under act-order): it is the grid
QuantEase keeps fixed afterwards, and a static column order needs no ``g_idx``
at inference. Dead columns are cut out of the Hessian rather than zeroed, so
they keep the round-to-nearest value of ``W``.
"""

from __future__ import annotations

from typing import Callable

import torch

from qe_vllm.converters.grid import column_grid, fit, quantize, round_to_grid
from qe_vllm.converters.objective import Quadratic, exact_matmul
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.result import QuantResult

RowRounder = Callable[[int, torch.Tensor], torch.Tensor]


def lazy_block_sweep(
    x: torch.Tensor,
    base: torch.Tensor,
    coupling: torch.Tensor,
    round_row: RowRounder,
    block_size: int,
) -> None:
    """Quantize the rows of ``x`` ``[in, out]`` in order, in place; shared by GPTQ and QuantEase.

    Row ``j`` (one weight column, all output rows at once) gets the value
    ``y = round_row(j, x[j])``, written to ``base[j]``; the step ``base[j] - y``
    then moves every later row: ``x[k] += coupling[j, k] * (base[j] - y)``, k > j.
    Inside a block of ``block_size`` rows that update is applied row by row;
    rows beyond the block receive all of the block's steps at once, as one GEMM
    (GPTQ's lazy batch update): the same result, with the row-by-row traffic of
    a pass cut from O(out * in^2) to O(out * in * block_size). Only the strict
    upper triangle of ``coupling`` is read.
    """
    p = x.shape[0]
    for start in range(0, p, block_size):
        end = min(start + block_size, p)
        steps = torch.empty(end - start, x.shape[1], dtype=x.dtype, device=x.device)
        for j in range(start, end):
            y = round_row(j, x[j])
            torch.sub(base[j], y, out=steps[j - start])
            base[j] = y
            x[j + 1 : end].addr_(coupling[j, j + 1 : end], steps[j - start])
        x[end:].addmm_(coupling[start:end, end:].t(), steps)


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1 = (h + damp * mean(diag h) * I)^-1``, in float64.

    Computed without forming ``H^-1``: with ``J`` the reversal permutation and
    ``J H J = L L^T``, ``U = J L^-1 J`` -- one Cholesky and one triangular
    inverse instead of a Cholesky, an inverse and a second Cholesky.

    A rank-deficient ``h`` (fewer tokens than features) with little or no
    damping is not numerically positive definite; the damping then grows
    tenfold until the factorisation succeeds, instead of failing the layer.
    """
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    h = h.double()
    lam = damp * float(h.diagonal().mean())
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex((h + lam * eye).flip(0, 1))
        if int(info) == 0:
            return torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
        lam = 10 * lam if lam > 0 else 1e-8 * float(h.diagonal().mean())
    raise ValueError(f"Hessian not positive definite even with damping {lam:.3g}; NaN in sigma?")


@exact_matmul()
def gptq(
    w: torch.Tensor,
    problem: Quadratic | torch.Tensor,
    opts: ConvertOptions,
    *,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
    outlier_mask: torch.Tensor | None = None,
    block_size: int = 128,
) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` by GPTQ on ``problem`` (or a bare Hessian ``Σ``).

    ``opts.act_order`` quantizes columns by decreasing ``Σ_jj`` (the columns
    whose error matters most go first, while the most columns remain to
    compensate); ``opts.damp`` is the dampening. ``outlier_mask`` (bool
    ``[out, in]``) marks weights kept in float16 instead of on the grid; their
    dense part is 0 and they absorb the error propagated to them, so they hold
    the compensated value. ``grid`` (``scales``, ``zeros``) defaults to the
    grid of ``opts`` fitted on the non-outliers.

    With the error-propagation objective (``problem.shift = M``), GPTQ
    quantizes the target ``T`` with ``T H = W H + W M``: ``f`` is then
    ``tr((T - V) H (T - V)ᵀ)`` plus a constant. ``T = W + (W M) H⁻¹`` comes
    from the factor already at hand, ``H⁻¹ = Uᵀ U`` (QEP's weight correction).
    """
    if isinstance(problem, torch.Tensor):
        problem = Quadratic.of(problem)
    spec = opts.spec
    w = w.float()
    p = w.shape[1]
    scales, zeros = grid if grid is not None else fit(w, spec, outlier_mask, mse=opts.mse_grid)
    h = problem.sigma.to(w.device, torch.float64, copy=True)
    dead = problem.dead.to(w.device)
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = 1  # no coupling: a dead column keeps its own RTN value
    order = (
        torch.argsort(h.diagonal().masked_fill(dead, 0.0), descending=True, stable=True)
        if opts.act_order
        else torch.arange(p, device=w.device)
    )
    u = inverse_cholesky(h[order][:, order], opts.damp)
    target = w[:, order].double()
    if problem.shift is not None:
        drift = (w.double() @ problem.shift.to(w.device, torch.float64)).masked_fill(dead, 0.0)
        target += (drift[:, order] @ u.t()) @ u
    coupling = (-u / u.diagonal()[:, None]).float()

    col_scale, col_zero = (t[order] for t in column_grid(scales, zeros, spec, p, torch.float32))
    x = target.float().t().contiguous()
    keep = None if outlier_mask is None else outlier_mask[:, order].t().contiguous()

    def round_row(j: int, col: torch.Tensor) -> torch.Tensor:
        y = round_to_grid(col, col_scale[j], col_zero[j], spec.maxq)
        return y if keep is None else torch.where(keep[j], col.half().float(), y)

    lazy_block_sweep(x, x, coupling, round_row, block_size)
    w_hat = torch.empty_like(w)
    w_hat[:, order] = x.t()
    if outlier_mask is None:
        return QuantResult(quantize(w_hat, scales, zeros, spec), scales, zeros)
    dense = w_hat.masked_fill(outlier_mask, 0.0)
    return QuantResult(quantize(dense, scales, zeros, spec), scales, zeros, w_hat - dense)
