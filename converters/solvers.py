"""The pipeline's entry point: ``solve(w, stats, opts)`` quantizes one layer."""

from __future__ import annotations

import torch

from qe_vllm.converters.gptq import gptq
from qe_vllm.converters.objective import LayerStats, Quadratic
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.outliers import initial_support, outlier_budget, quantease_outliers
from qe_vllm.converters.quantease import quantease
from qe_vllm.converters.result import QuantResult
from qe_vllm.converters.rtn import rtn


def solve(w: torch.Tensor, stats: LayerStats | torch.Tensor | None, opts: ConvertOptions) -> QuantResult:
    """Quantize one layer ``w`` ``[out, in]`` given its calibration ``stats`` (or a bare Σ).

    ``stats`` may be ``None`` for ``"rtn"`` only.

    * ``"rtn"``: round to nearest, the largest weights as outliers;
    * ``"gptq"``: GPTQ, with outliers (:func:`initial_support`) held exactly
      while the rest compensates;
    * ``"quantease"``: QuantEase sweeps from ``opts.init``; with
      ``opts.outlier_fraction > 0`` the outlier-aware variant.

    The calibrated methods minimise the objective ``Quadratic.of(stats,
    opts.propagation)`` (``converters/objective.py``).
    """
    opts.check_solver()
    if opts.method == "rtn":
        return rtn(w, opts)
    if stats is None:
        raise ValueError(f"method {opts.method!r} needs calibration statistics; 'rtn' does not")
    problem = Quadratic.of(stats, opts.propagation, w)
    budget = outlier_budget(w.shape, opts.outlier_fraction, opts.outlier_structure)
    if opts.method == "gptq":
        mask = initial_support(w.float(), problem.sigma.diagonal(), budget, opts.outlier_structure)
        return gptq(w, problem, opts, outlier_mask=mask if budget else None)
    if budget:
        return quantease_outliers(w, problem, opts)
    return quantease(w, problem, opts)
