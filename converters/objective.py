"""The layer objective every solver minimises, and the numerical conventions they share.

For a linear layer ``W`` ``[out, in]``, the classic layer-wise objective of a
quantized ``V`` is the output error on the calibration inputs ``X``
(``Σ = X Xᵀ`` ``[in, in]``):

    f(V) = ||W X - V X||² = tr((W - V) Σ (W - V)ᵀ).

**Error propagation.** Deep in a quantized model a layer does not see the
full-precision inputs ``X_fp`` but the drifted ``X_q`` that the quantized
blocks before it produce. What inference needs is the full-precision *output*
from those inputs (the QEP/GPTAQ target):

    f_α(V) = α ||W X_fp - V X_q||² + (1 - α) ||W X_q - V X_q||²
           = tr(V Σ Vᵀ) - 2 tr(W A Vᵀ) + tr(W C Wᵀ),

with ``Σ = X_q X_qᵀ``, ``A = α X_fp X_qᵀ + (1 - α) Σ`` and
``C = α X_fp X_fpᵀ + (1 - α) Σ``. Writing ``A = Σ + M`` and ``e = W - V``:

    f_α(V) = tr(e Σ eᵀ) + 2 tr(W M eᵀ) + tr(W (C + Σ - 2A) Wᵀ),

the classic objective (``M = 0``) plus a term linear in ``e`` and a constant
(the error the *unquantized* layer already makes on drifted inputs). The
gradient in ``V`` is ``-2 ((W - V) Σ + W M)``: solvers only ever need ``Σ``
and the fixed matrix ``W M``. :class:`Quadratic` holds exactly that problem.

The constant is needed only as a number (it scales the solvers' stopping test),
and ``C + Σ - 2A = α (X_fp - X_q)(X_fp - X_q)ᵀ`` inside the trace, so

    tr(W (C + Σ - 2A) Wᵀ) = α (||W X_fp||² + tr(W Σ Wᵀ) - 2 tr(W X_fp X_qᵀ Wᵀ)):

the full-precision layer's output energy ``||W X_fp||²`` replaces the whole
``[in, in]`` matrix ``X_fp X_fpᵀ``. It is read off the full-precision block's
outputs, which calibration computes anyway; the matrix would cost one more
GEMM of the size of Σ per sample (``converters/statistics.py``).

**Regularization.** Σ measured on a few hundred windows of one text is a noisy
estimate of the Σ of the text the model will serve; its off-diagonal part
(how inputs co-vary) transfers worst. Two ridge terms, both exact
reformulations of the same quadratic family:

* ``shrink`` s: every second-moment matrix ``S`` becomes ``(1 - s) S + s D``,
  ``D = diag(Σ)``, i.e. ``(1 - s) f + s Σ_j Σ_jj ||w_j - v_j||²``: damping
  scaled *per column* by that input's own energy;
* ``cd_damp`` λ: ``S + λ mean(diag Σ) I``, a uniform ridge (GPTQ's style).

Errors are always reported on the raw statistics: regularization is a solver
device, not part of the problem.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch

DEAD_EPS = 1e-6
"""A column with ``sigma_jj <= DEAD_EPS * mean(diag(sigma))`` is dead: its input
carries no measurable energy, so the objective cannot tell its weights apart."""


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one linear input (float64 ``[in, in]``, summed over tokens).

    ``sigma = Σ x_q x_qᵀ`` over the inputs the layer receives in the model being
    quantized. With error propagation, ``cross = Σ x_fp x_qᵀ`` pairs them with
    the same tokens' inputs in the full-precision model, and ``fp_energy =
    Σ ||W x_fp||²`` is the full-precision layer's output energy (a property of
    one layer, where the matrices belong to its input, shared by a group).
    """

    sigma: torch.Tensor
    cross: torch.Tensor | None = None
    fp_energy: float | None = None

    @property
    def propagated(self) -> bool:
        return self.cross is not None


@dataclass(frozen=True)
class Quadratic:
    """``f(V) = tr(e Σ eᵀ) + 2 tr(W M eᵀ) + tr(W K Wᵀ)``, ``e = W - V`` (module docstring).

    ``shift`` is ``M`` and ``offset`` is the number ``tr(W K Wᵀ)`` for the
    layer's own ``W``; both ``None`` for the classic objective. ``dead`` marks
    the columns of the *unregularized* Σ without measurable energy
    (:func:`dead_columns`).
    """

    sigma: torch.Tensor
    shift: torch.Tensor | None = None
    offset: float | None = None
    dead: torch.Tensor | None = None

    @staticmethod
    def of(
        stats: LayerStats | torch.Tensor, propagation: float = 0.0, w: torch.Tensor | None = None
    ) -> "Quadratic":
        """The objective ``f_α`` of ``stats`` with ``α = propagation``, for the layer ``w``.

        ``w`` is needed only with propagation, for the constant (module docstring).
        """
        if isinstance(stats, torch.Tensor):
            stats = LayerStats(stats)
        sigma = stats.sigma
        dead = dead_columns(sigma)
        if propagation == 0 or not stats.propagated:
            return Quadratic(sigma, dead=dead)
        if w is None or stats.fp_energy is None:
            raise ValueError("the error-propagation objective needs the layer's weight and fp_energy")
        a = sigma + propagation * (stats.cross - sigma)
        w = w.to(sigma.device, torch.float64)
        drift_error = stats.fp_energy + quadratic_form(w, sigma) - 2 * quadratic_form(w, stats.cross)
        return Quadratic(sigma, a - sigma, propagation * drift_error, dead)

    def regularized(self, shrink: float, damp: float) -> "Quadratic":
        """Every second moment ``S`` to ``(1 - shrink) S + shrink D + damp mean(D) I``."""
        if shrink == 0 and damp == 0:
            return self
        d = torch.diag_embed(self.sigma.diagonal())
        ridge = shrink * d + damp * float(self.sigma.diagonal().mean()) * torch.eye(
            d.shape[0], dtype=d.dtype, device=d.device
        )
        # Σ, A = Σ + M and C = K - Σ + 2A each become (1 - s) S + ridge, so M scales by
        # (1 - s) and K by (1 - s) too (the ridge cancels in C + Σ - 2A).
        keep = 1.0 - shrink
        scale = (lambda t: None if t is None else keep * t)
        return replace(
            self, sigma=keep * self.sigma + ridge, shift=scale(self.shift), offset=scale(self.offset)
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> "Quadratic":
        shift = None if self.shift is None else self.shift.to(device, dtype)
        return Quadratic(self.sigma.to(device, dtype), shift, self.offset, self.dead.to(device))

    def value(self, w: torch.Tensor, v: torch.Tensor) -> float:
        """``f(V)`` in float64; ``w`` is the layer's weight the problem was made for."""
        w = w.double().to(self.sigma.device)
        e = w - v.double().to(w.device)
        f = quadratic_form(e, self.sigma)
        if self.shift is not None:
            f += 2 * float(((w @ self.shift.double()) * e).sum()) + self.offset
        return f


def quadratic_form(w: torch.Tensor, s: torch.Tensor) -> float:
    """``tr(W S Wᵀ)`` in float64, on ``s``'s device."""
    w = w.double().to(s.device)
    return float(((w @ s.double()) * w).sum())


def objective(w: torch.Tensor, w_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    """``tr((W - W_hat) sigma (W - W_hat)^T)`` in float64."""
    return quadratic_form(w.double() - w_hat.double(), sigma)


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


@contextmanager
def exact_matmul() -> Iterator[None]:
    """Run float32 matmuls in full precision (TF32 off), restoring the caller's settings after.

    Coordinate descent forms ``(W - W_hat) sigma``, a small difference pushed
    through a large matrix, and Σ is a sum of many such products; TF32's 10-bit
    mantissa makes the descent non-monotone. Usable as a decorator. (Only
    torch's ``allow_tf32`` flags are touched: torch refuses to read its newer
    precision settings once a caller has used these.)
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
