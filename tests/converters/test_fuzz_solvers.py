"""Property tests of ``qe_vllm.converters.solvers.solve`` on random small layers.

Whatever the method, grid and outlier settings, a solver must return codes in
range, finite positive scales, zero points in range, at most the outlier
budget, a finite effective weight, and tensors the format validator accepts
and that mean exactly that weight (up to the float16 rounding of outliers).
Inputs include dead input channels, rank-deficient Σ, all-zero and constant
rows, widths that are not multiples of the group size, and magnitudes from
1e-6 to ~1e4. Nearer the float16 limit (65504) GPTQ's compensation can overflow
the outliers it holds; the pipeline refuses such weights (``check_fits``) and
such solutions (``check_solution``), tested in tests/qe_vllm/test_reliability_convert.py.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from qe_vllm.converters.options import METHODS, ConvertOptions
from qe_vllm.converters.outliers import outlier_budget
from qe_vllm.converters.solvers import solve
from qe_vllm.converters.objective import LayerStats
from qe_vllm.format import QuantEaseConfig, dense_weight, sym_zero, validate_linear


@st.composite
def problems(draw: st.DrawFn) -> dict:
    method = draw(st.sampled_from(METHODS))
    structure = "unstructured" if method == "rtn" else draw(st.sampled_from(["unstructured", "columns"]))
    out_f, in_f = draw(st.integers(1, 10)), draw(st.integers(2, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([1e-6, 1e-3, 0.05, 1.0, 100.0]))
    w = scale * torch.randn(out_f, in_f, generator=g) * torch.exp(torch.randn(out_f, in_f, generator=g))
    special = draw(st.sampled_from(["none", "zero-row", "constant-row"]))
    if special == "zero-row":
        w[0] = 0
    elif special == "constant-row":
        w[0] = 0.5 * scale
    n = draw(st.integers(1, 2 * in_f))  # fewer samples than inputs: rank-deficient Σ
    x = torch.randn(in_f, n, generator=g)
    if draw(st.booleans()):
        x[: max(1, in_f // 4)] = 0  # dead input channels
    return {
        "method": method,
        "w": w,
        "x": x,
        "bits": draw(st.sampled_from([2, 3, 4, 8])),
        "group_size": draw(st.sampled_from([-1, 8, 16])),
        "sym": draw(st.booleans()),
        "outlier_fraction": draw(st.sampled_from([0.0, 0.02, 0.1, 0.25])),
        "outlier_structure": structure,
        "iters": draw(st.integers(1, 3)),
        "init": draw(st.sampled_from(["w", "rtn", "gptq"])),
        "propagation": draw(st.sampled_from([0.0, 1.0])),
        "shrink": draw(st.sampled_from([0.0, 0.2])),
        "drift": draw(st.sampled_from([0.0, 0.5])),
    }


@settings(max_examples=80, deadline=None)
@given(problems())
def test_solver_output_is_in_range_within_budget_and_valid(p: dict) -> None:
    w, x = p["w"], p["x"]
    x_fp = x + p["drift"] * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    stats = LayerStats((x @ x.T).double(), (x_fp @ x.T).double(), float((w.double() @ x_fp.double()).square().sum()))
    opts = ConvertOptions(
        method=p["method"], bits=p["bits"], group_size=p["group_size"], sym=p["sym"],
        outlier_fraction=p["outlier_fraction"], outlier_structure=p["outlier_structure"],
        iters=p["iters"], init=p["init"], propagation=p["propagation"], shrink=p["shrink"],
    )
    spec = opts.spec
    res = solve(w, None if p["method"] == "rtn" else stats, opts)
    out_f, in_f = w.shape
    assert res.codes.shape == (out_f, in_f)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= spec.maxq
    assert bool(torch.isfinite(res.scales).all()) and bool((res.scales > 0).all())
    assert int(res.zeros.min()) >= 0 and int(res.zeros.max()) <= spec.maxq
    if spec.sym:
        assert bool((res.zeros == sym_zero(spec.bits)).all())

    budget = outlier_budget(w.shape, p["outlier_fraction"], p["outlier_structure"])
    if res.outliers is not None:
        kept = res.outliers != 0
        used = int(kept.any(dim=0).sum()) if p["outlier_structure"] == "columns" else int(kept.sum())
        assert used <= budget
    else:
        assert budget == 0
    effective = res.weight(spec.group_size)
    assert bool(torch.isfinite(effective).all())

    cfg = QuantEaseConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
    tensors = res.to_tensors(cfg)
    validate_linear("fuzz", tensors, cfg, out_f, in_f)
    stored = dense_weight(tensors, cfg, in_f)
    torch.testing.assert_close(stored, effective, rtol=1e-3, atol=1e-3 * float(w.abs().max()) + 1e-6)
