"""Outlier-aware QuantEase (paper Algorithm 3): a few weights leave the grid and are stored exactly.

    min_{W_hat, H} tr((W - W_hat - H) sigma (W - W_hat - H)^T),   W_hat on the grid,   H sparse,

with a budget of ``round(fraction * out * in)`` entries (``"unstructured"``) or
``round(fraction * in)`` whole input columns (``"columns"``). Each iteration
takes one iterative-hard-thresholding step on ``H`` and one QuantEase sweep on
the target ``W - H``:

    H <- T(H - eta (W_hat + H - W) sigma),   eta = 1 / (2 lambda_max(sigma)),

``T`` keeping the largest entries (or columns of largest norm): the exact
projection onto the budget, which therefore holds exactly. ``(W_hat + H - W)
sigma`` is half the gradient, so ``eta`` is half the ``1/L`` step, slack for
the power iteration's underestimate of ``lambda_max``; a step that would raise
``f`` anyway is dropped, so ``f`` never increases. ``H`` is rounded to its
stored dtype at every step, so the sweeps see exactly the outliers the
checkpoint holds. The reference code's defects are absent by construction:
the sweep writes ``W_hat`` (D1), and ``N`` divides every correction by
``sigma_jj`` (D2).
"""

from __future__ import annotations

import torch

from qe_vllm.converters.grid import GridSpec, fit_grid, fit_grid_mse, quantize
from qe_vllm.converters.objective import damped, exact_matmul
from qe_vllm.converters.quantease import CoordinateDescent, initial_point, stalled
from qe_vllm.converters.result import QuantResult

STRUCTURES = ("unstructured", "columns")


def outlier_budget(shape: torch.Size | tuple[int, int], fraction: float, structure: str) -> int:
    """Entries (``"unstructured"``) or input columns (``"columns"``) that may leave the grid."""
    if structure not in STRUCTURES:
        raise ValueError(f"outlier structure {structure!r}; choose one of {list(STRUCTURES)}")
    out_f, in_f = shape
    return round(fraction * in_f) if structure == "columns" else round(fraction * out_f * in_f)


def largest(v: torch.Tensor, budget: int, structure: str) -> torch.Tensor:
    """Bool mask of the ``budget`` largest ``|v|`` entries, or ``budget`` columns of top norm."""
    mask = torch.zeros_like(v, dtype=torch.bool)
    if structure == "columns":
        mask[:, torch.topk(v.norm(dim=0), budget).indices] = True
    else:
        mask.view(-1)[torch.topk(v.abs().flatten(), budget).indices] = True
    return mask


def lambda_max(sigma: torch.Tensor, iters: int = 30, seed: int | None = None) -> float:
    """Largest eigenvalue of the PSD ``sigma`` by power iteration (an estimate from below)."""
    gen = torch.Generator(sigma.device).manual_seed(0 if seed is None else seed)
    v = torch.randn(sigma.shape[0], generator=gen, device=sigma.device, dtype=sigma.dtype)
    for _ in range(iters):
        v = sigma @ v
        v = v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
    return float(v @ sigma @ v)


@exact_matmul()
def quantease_outliers(
    w: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    fraction: float,
    *,
    structure: str = "unstructured",
    iters: int = 5,
    init: str = "gptq",
    damp: float = 0.0,
    init_damp: float = 0.01,
    act_order: bool = False,
    tol: float = 1e-4,
    block_size: int = 128,
    mse_grid: bool = False,
    dtype: torch.dtype = torch.float32,
    outlier_dtype: torch.dtype = torch.float16,
    power_iters: int = 30,
    seed: int | None = None,
) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` to a grid part plus ``fraction`` sparse outliers.

    The outliers start as the largest weights (or columns of largest norm),
    and the grid is fitted, once, on the rest. The result's ``outliers`` hold
    ``H`` (values representable in ``outlier_dtype``; ``None`` for a zero
    budget), on top of the dense part. Other arguments as for
    :func:`~qe_vllm.converters.quantease.quantease`; ``seed`` picks the power
    iteration's start.
    """
    w = w.float()
    sigma = sigma.to(w.device)
    budget = outlier_budget(w.shape, fraction, structure)
    mask = largest(w, budget, structure)
    grid = (fit_grid_mse if mse_grid else fit_grid)(w, spec, exclude=mask)
    w_hat, h = initial_point(
        w, sigma, spec, grid, init, damp=init_damp, act_order=act_order,
        outlier_mask=mask, outlier_dtype=outlier_dtype,
    )
    w, w_hat, h, sigma = (t.to(dtype) for t in (w, w_hat, h, sigma))
    cd = CoordinateDescent(sigma, spec, *grid, damp=damp, block_size=block_size)
    lam = lambda_max(damped(sigma, damp), power_iters, seed)
    eta = 0.5 / lam if lam > 0 else 0.0

    g, f = cd.gradient(w - h, w_hat)
    history = [f] if cd.on_grid(w_hat) else []
    for _ in range(iters):
        step = h + eta * g * cd.col_norm  # H - eta (W_hat + H - W) sigma
        h_new = step.where(largest(step, budget, structure), 0.0).to(outlier_dtype).to(dtype)
        g_new, f_new = cd.gradient(w - h_new, w_hat)
        if f_new <= f:
            h, g = h_new, g_new
        w_hat = cd.sweep(w - h, w_hat, g)
        g, f = cd.gradient(w - h, w_hat)
        history.append(f)
        if stalled(history, tol):
            break
    codes = quantize(w_hat.float(), *grid, spec)
    return QuantResult(codes, *grid, h.float() if budget > 0 else None)
