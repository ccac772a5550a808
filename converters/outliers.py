"""Outlier-aware QuantEase (paper Algorithm 3): a few weights leave the grid and are stored in float16.

    min_{V, S} f(V)   s.t.  V_ij on row i's grid for (i, j) ∉ S,   |S| ≤ s,

with ``f`` the layer objective (``converters/objective.py``), a budget of
``round(fraction · out · in)`` entries (``"unstructured"``) or
``round(fraction · in)`` whole input columns (``"columns"``). Inside ``S`` the
grid part is 0 (the grid contains 0) and the stored outlier is the whole value.

**The weights, for a fixed support.** A support entry is a free coordinate:
its coordinate step is the exact minimiser ``β_ij`` (rounded to float16), the
others round ``β_ij`` onto the grid (``converters/quantease.py``). So one
sweep updates grid part and outliers together, and never increases ``f``.

**The support.** With all else fixed, ``f`` as a function of ``V_ij`` is
``Σ_jj (V_ij - β_ij)² + const``. Forcing a free entry onto the grid therefore
costs ``score_ij = Σ_jj (q_ij(β_ij) - β_ij)²`` (``q_ij`` rounds onto row ``i``'s
grid), and freeing a grid entry gains exactly its ``score_ij``. Before each
sweep the support becomes the ``s`` entries (or columns, summing the score)
of highest score: a swap of an entry for one with a higher score lowers ``f``
when made alone. Swaps made together interact through Σ, so a sweep whose new
support ends with a higher ``f`` is undone and the support frozen from then on:
``f`` never increases.

The paper's iterative-hard-thresholding step ``H ← T_s(H − η ∇_H f)`` with
``η = 1 / (2 λ_max(Σ))`` does not do this job: on real layers ``λ_max`` is
orders of magnitude above a typical ``Σ_jj``, so the step moves ``H`` by a tiny
fraction of one coordinate step and the support never changes.

**Start.** Unstructured: the largest ``|W|``, so the grid, fitted once on the
other weights, is not stretched by them. Columns: the columns of largest
``||W_:,j||² Σ_jj``, the output energy they carry (by ``||W_:,j||`` alone the
variant lost to plain QuantEase on SmolLM2; see docs/ALGORITHM.md).
"""

from __future__ import annotations

import torch

from qe_vllm.converters.grid import fit, quantize, round_to_grid
from qe_vllm.converters.objective import Quadratic, exact_matmul
from qe_vllm.converters.options import STRUCTURES, ConvertOptions
from qe_vllm.converters.quantease import CoordinateDescent, initial_point, stalled
from qe_vllm.converters.result import QuantResult


def outlier_budget(shape: torch.Size | tuple[int, int], fraction: float, structure: str) -> int:
    """Entries (``"unstructured"``) or input columns (``"columns"``) that may leave the grid."""
    if structure not in STRUCTURES:
        raise ValueError(f"outlier structure {structure!r}; choose one of {list(STRUCTURES)}")
    out_f, in_f = shape
    return round(fraction * in_f) if structure == "columns" else round(fraction * out_f * in_f)


def top(score: torch.Tensor, budget: int, structure: str) -> torch.Tensor:
    """Bool mask of the ``budget`` highest-scoring entries, or columns by summed score."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if structure == "columns":
        mask[:, torch.topk(score.sum(dim=0), budget).indices] = True
    else:
        mask.view(-1)[torch.topk(score.flatten(), budget).indices] = True
    return mask


def initial_support(w: torch.Tensor, sigma_diag: torch.Tensor, budget: int, structure: str) -> torch.Tensor:
    """Largest ``|W|`` entries, or the columns of largest ``||W_:,j||² Σ_jj`` (module docstring)."""
    if structure == "columns":
        return top(w.square() * sigma_diag.to(w), budget, structure)
    return top(w.abs(), budget, structure)


def support_score(
    cd: CoordinateDescent, v: torch.Tensor, g: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``Σ_jj (q(β) - β)²`` per entry: what leaving the grid would gain (module docstring).

    The objective cannot see dead columns (weight 0), so their entries keep
    their place: in the support (the largest weights, which the grid does not
    cover) or out of it.
    """
    beta = (v + g).t()
    gap = round_to_grid(beta, cd.col_scale, cd.col_zero, cd.maxq) - beta
    score = (gap.square() * cd.weight[:, None]).t()
    dead = cd.weight == 0
    return torch.where(dead & mask, torch.inf, score)


@exact_matmul()
def quantease_outliers(w: torch.Tensor, problem: Quadratic, opts: ConvertOptions) -> QuantResult:
    """Quantize ``w`` ``[out, in]`` to a grid part plus ``opts.outlier_fraction`` sparse outliers.

    The result's ``outliers`` hold the float16 values on top of the dense part
    (``None`` for a zero budget). Other settings as for
    :func:`~qe_vllm.converters.quantease.quantease`.
    """
    w = w.float()
    problem = problem.to(w.device, torch.float64)
    structure = opts.outlier_structure
    budget = outlier_budget(w.shape, opts.outlier_fraction, structure)
    mask = initial_support(w, problem.sigma.diagonal(), budget, structure)
    grid = fit(w, opts.spec, mask, mse=opts.mse_grid)
    v = initial_point(w, problem, opts, grid, mask)
    regularized = problem.regularized(opts.shrink, opts.cd_damp)

    def solver(free: torch.Tensor) -> CoordinateDescent:
        return CoordinateDescent(w, regularized, opts.spec, grid, free=free)

    cd = solver(mask)
    g, f = cd.gradient(v)
    history = [f]
    swapping = budget > 0
    for _ in range(opts.iters):
        if swapping:
            new = top(support_score(cd, v, g, mask), budget, structure)
            trial = solver(new)
            v_new = trial.sweep(v, trial.gradient(v)[0])
            g_new, f_new = trial.gradient(v_new)
            if f_new < f:
                cd, mask, v, g, f = trial, new, v_new, g_new, f_new
                history.append(f)
                if stalled(history, 1e-4):
                    break
                continue
            swapping = False
        v = cd.sweep(v, g)
        g, f = cd.gradient(v)
        history.append(f)
        if stalled(history, 1e-4):
            break
    dense = v.masked_fill(mask, 0.0)
    outliers = (v - dense) if budget > 0 else None
    return QuantResult(quantize(dense, *grid, opts.spec), *grid, outliers)
