"""The layer objective every solver minimises, and the numerical conventions they share.

For a linear layer ``W`` ``[out, in]`` and ``sigma = sum_t x_t x_t^T`` ``[in, in]``
over the calibration tokens, the output error of a quantized ``W_hat`` is

    f(W_hat) = ||W X - W_hat X||_F^2 = tr((W - W_hat) sigma (W - W_hat)^T).

Errors are always reported on the raw ``sigma``: damping is a solver device,
not part of the problem.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

DEAD_EPS = 1e-6
"""A column with ``sigma_jj <= DEAD_EPS * mean(diag(sigma))`` is dead: its input
carries no measurable energy, so the objective cannot tell its weights apart."""


def objective(w: torch.Tensor, w_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    """``tr((W - W_hat) sigma (W - W_hat)^T)`` in float64."""
    e = (w.double() - w_hat.double()).to(sigma.device)
    return float(((e @ sigma.double()) * e).sum())


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    """Relative reconstruction error ``f(W_hat) / tr(W sigma W^T)``; 0 for a layer without input."""
    total = objective(w, torch.zeros_like(w), sigma)
    return objective(w, w_hat, sigma) / total if total > 0 else 0.0


def dead_columns(sigma: torch.Tensor, eps: float = DEAD_EPS) -> torch.Tensor:
    """Bool ``[in]``: columns whose ``sigma_jj`` is negligible next to the mean diagonal.

    Relative, not ``== 0``: a near-zero diagonal makes ``x / sigma_jj`` amplify
    rounding noise. All columns are dead when ``sigma`` is zero (an MoE expert
    that received no tokens).
    """
    d = sigma.diagonal()
    return d <= eps * d.mean()


def damped(sigma: torch.Tensor, damp: float) -> torch.Tensor:
    """``sigma + damp * mean(diag(sigma)) * I`` (GPTQ's dampening; a ridge pull towards W)."""
    if damp == 0:
        return sigma
    return sigma + damp * sigma.diagonal().mean() * torch.eye(
        sigma.shape[0], dtype=sigma.dtype, device=sigma.device
    )


@contextmanager
def exact_matmul() -> Iterator[None]:
    """Run float32 matmuls in full precision (TF32 off), restoring the caller's setting after.

    Coordinate descent forms ``(W - W_hat) sigma``, a small difference pushed
    through a large matrix; TF32's 10-bit mantissa makes the descent
    non-monotone. Usable as a decorator.
    """
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
