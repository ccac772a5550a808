"""Oracle tests of the layer solvers: GPTQ, QuantEase, outlier-aware QuantEase, and ``solve``.

Every check compares against something computed independently: round-to-nearest,
a naive coordinate-descent or OBS loop, brute force over a coordinate's grid,
or the objective evaluated directly in float64 from the activations.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qe_vllm.converters.gptq import gptq
from qe_vllm.converters.grid import (
    GridSpec,
    column_grid,
    dequantize,
    fit,
    fit_grid,
    fit_grid_mse,
    quantize,
    round_to_grid,
)
from qe_vllm.converters.objective import (
    LayerStats,
    Quadratic,
    exact_matmul,
    layer_error,
    objective,
    quadratic_form,
)
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.outliers import initial_support, quantease_outliers, top
from qe_vllm.converters.quantease import CoordinateDescent, coordinate_descent, initial_point, quantease
from qe_vllm.converters.rtn import rtn
from qe_vllm.converters.solvers import solve

SPECS = [dict(bits=3, group_size=-1), dict(bits=2, group_size=16), dict(bits=4, group_size=32, sym=True)]


PLAIN = {"bits": 3, "group_size": -1, "shrink": 0.0, "mse_grid": False, "propagation": 0.0, "act_order": False}


def opts(**kw) -> ConvertOptions:
    """The solvers on their own objective, min/max grid and natural column order, unless a test says otherwise."""
    return ConvertOptions(**{**PLAIN, **kw})


def layer(q: int = 48, p: int = 96, *, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Heavy-tailed weights and a correlated sigma (low rank + noise, a few loud channels)."""
    w, x = layer_and_inputs(q, p, n=n, seed=seed)
    return w, x @ x.T


def layer_and_inputs(q: int, p: int, *, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, 8, generator=g) @ torch.randn(8, n, generator=g)
    x += 0.3 * torch.randn(p, n, generator=g)
    x[:4] *= 10
    w = 0.05 * torch.randn(q, p, generator=g) * torch.exp(0.5 * torch.randn(q, p, generator=g))
    return w, x


def weight(r, o: ConvertOptions) -> torch.Tensor:
    return r.weight(o.group_size)


def err(w: torch.Tensor, r, sigma: torch.Tensor, o: ConvertOptions) -> float:
    return layer_error(w, weight(r, o), sigma)


def sweeper(w, sigma, o, grid, **kw) -> CoordinateDescent:
    return CoordinateDescent(w, Quadratic.of(sigma), o.spec, grid, dtype=w.dtype, **kw)


def naive_sweep(w, sigma, spec, scales, zeros, w_hat) -> torch.Tensor:
    """Column by column: beta_ij = W_hat_ij + [(W - W_hat) sigma]_ij / sigma_jj, then round."""
    w_hat = w_hat.clone()
    s, z = (t.t() for t in column_grid(scales, zeros, spec, w.shape[1], w.dtype))
    for j in range(w.shape[1]):
        beta = w_hat[:, j] + (w - w_hat) @ sigma[:, j] / sigma[j, j]
        w_hat[:, j] = round_to_grid(beta, s[:, j], z[:, j], spec.maxq)
    return w_hat


def naive_gptq(w, sigma, spec, scales, zeros, damp) -> torch.Tensor:
    """OBS, no Cholesky, no blocks: quantize column j, spread its error by H^-1, drop j."""
    w = w.double().clone()
    sigma = sigma.double()
    hinv = torch.linalg.inv(sigma + damp * sigma.diagonal().mean() * torch.eye(w.shape[1]))
    s, z = (t.t().double() for t in column_grid(scales, zeros, spec, w.shape[1], torch.float32))
    for j in range(w.shape[1]):
        qj = round_to_grid(w[:, j], s[:, j], z[:, j], spec.maxq)
        w[:, j + 1 :] -= torch.outer((w[:, j] - qj) / hinv[j, j], hinv[j, j + 1 :])
        w[:, j] = qj
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w


# ------------------------------------------------------------ sigma = I: nothing to compensate


@pytest.mark.parametrize("spec", SPECS)
def test_identity_sigma_gives_rtn_exactly(spec):
    w, _ = layer(32, 64)
    eye = torch.eye(64, dtype=torch.float64)
    expected = rtn(w, opts(**spec)).codes
    assert torch.equal(gptq(w, eye, opts(**spec)).codes, expected)
    assert torch.equal(gptq(w, eye, opts(**spec, act_order=True)).codes, expected)
    for init in ("w", "rtn", "gptq"):
        assert torch.equal(solve(w, eye, opts(**spec, init=init)).codes, expected), init


# --------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("spec", SPECS)
def test_gptq_matches_naive_obs_loop(spec):
    w, sigma = layer(16, 48, n=256)
    o = opts(**spec)
    scales, zeros = fit_grid(w, o.spec)
    expected = naive_gptq(w, sigma, o.spec, scales, zeros, 0.01)
    for block_size in (1, 7, 128):
        r = gptq(w, sigma, o, block_size=block_size)
        assert torch.equal(r.scales, scales) and torch.equal(r.zeros, zeros)  # static grid, from W
        assert torch.equal(r.codes, quantize(expected, scales, zeros, o.spec)), block_size


def test_gptq_act_order_and_rank_deficient_sigma():
    w, sigma = layer(32, 96, n=40)  # fewer tokens than features: singular sigma
    base = err(w, rtn(w, opts()), sigma, opts())
    for damp in (0.0, 0.01):
        for act_order in (False, True):
            r = gptq(w, sigma, opts(damp=damp, act_order=act_order))
            assert err(w, r, sigma, opts()) < 0.5 * base, (damp, act_order)


def test_gptq_outliers_hold_compensated_values():
    w, sigma = layer()
    o = opts()
    mask = top(w.abs(), 100, "unstructured")
    r = gptq(w, sigma, o, outlier_mask=mask)
    assert torch.equal(r.outliers != 0, mask)
    assert torch.equal(r.outliers, r.outliers.half().float())
    assert torch.equal(dequantize(r.codes, r.scales, r.zeros, -1)[mask], torch.zeros(100))
    assert not torch.equal(r.outliers[mask], w[mask].half().float())  # they absorbed error
    assert err(w, r, sigma, o) < err(w, gptq(w, sigma, o), sigma, o)


# --------------------------------------------------------------------------- QuantEase sweeps


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("init", ["w", "rtn", "gptq"])
def test_lazy_blocks_equal_naive_updates_bit_for_bit(spec, init):
    w, sigma = layer(16, 40, n=256)
    w, sigma = w.double(), sigma.double()
    o = opts(**spec, init=init)
    scales, zeros = fit_grid(w, o.spec)
    w_hat = initial_point(w.float(), Quadratic.of(sigma), o, (scales, zeros)).double()
    cd = sweeper(w, sigma, o, (scales, zeros), block_size=8)
    for _ in range(4):
        expected = naive_sweep(w, sigma, o.spec, scales, zeros, w_hat)
        before = w_hat.clone()
        new, _ = coordinate_descent(cd, w_hat, iters=1)
        assert torch.equal(new, expected)
        assert torch.equal(w_hat, before)  # the caller's iterate is never written
        w_hat = new


@pytest.mark.parametrize("spec", [dict(bits=2), dict(bits=3, sym=True)])
def test_converges_to_a_coordinatewise_minimum(spec):
    w, sigma = layer(5, 8, n=64, seed=3)
    w, sigma = w.double(), sigma.double()
    o = opts(**spec)
    scales, zeros = fit_grid(w, o.spec)
    cd = sweeper(w, sigma, o, (scales, zeros))
    w_hat = w
    for _ in range(100):
        prev = w_hat
        w_hat, _ = coordinate_descent(cd, w_hat, iters=1)
        if torch.equal(prev, w_hat):
            break
    else:
        pytest.fail("no fixed point within 100 sweeps")
    s, z = (t.t() for t in column_grid(scales, zeros, o.spec, 8, torch.float64))
    best = objective(w, w_hat, sigma)
    for i in range(5):
        for j in range(8):
            for code in range(o.spec.maxq + 1):
                moved = w_hat.clone()
                moved[i, j] = s[i, j] * (code - z[i, j])
                assert objective(w, moved, sigma) >= best * (1 - 1e-12), (i, j, code)


@pytest.mark.parametrize("dtype,slack", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("init", ["w", "gptq"])
def test_objective_never_increases(dtype, slack, init):
    w, sigma = layer()
    o = opts(bits=2, init=init)
    grid = fit_grid(w, o.spec)
    w_hat = initial_point(w, Quadratic.of(sigma), o, grid)
    cd = sweeper(w.to(dtype), sigma, o, grid)
    f = []
    for _ in range(5):
        w_hat, history = coordinate_descent(cd, w_hat, iters=1, tol=0.0)
        f.append(objective(w, w_hat, sigma))
        assert history[-1] == pytest.approx(f[-1], rel=1e-4)
    assert all(b <= a * (1 + slack) for a, b in zip(f, f[1:])), f
    _, history = coordinate_descent(cd, w.to(dtype), iters=5, tol=0.0)
    assert all(b <= a * (1 + slack) for a, b in zip(history, history[1:])), history


def test_early_stop():
    w, sigma = layer()
    o = opts()
    grid = fit_grid(w, o.spec)
    start = initial_point(w, Quadratic.of(sigma), o, grid)
    cd = sweeper(w, sigma, o, grid)
    _, history = coordinate_descent(cd, start, iters=50, tol=0.5)
    assert len(history) == 2  # the first sweep already gains less than half
    _, history = coordinate_descent(cd, start, iters=50, tol=0.0)
    assert len(history) < 51 and history[-1] == history[-2]


@pytest.mark.parametrize("spec", SPECS)
def test_quantease_beats_gptq_on_correlated_data(spec):
    w, sigma = layer()
    o = opts(**spec)
    gptq_err = err(w, gptq(w, sigma, o), sigma, o)
    assert gptq_err < 0.5 * err(w, rtn(w, o), sigma, o)
    assert err(w, solve(w, sigma, o), sigma, o) < 0.95 * gptq_err
    # never worse than its start, whatever the start's options
    for variant in ({"act_order": True}, {"damp": 0.05}, {"mse_grid": True, "iters": 2}):
        ov = replace(o, **variant)
        r = solve(w, sigma, ov)
        assert torch.equal(r.scales, fit(w, o.spec, mse=ov.mse_grid)[0])
        start = gptq(w, sigma, ov, grid=(r.scales, r.zeros))
        assert err(w, r, sigma, o) <= err(w, start, sigma, o), variant


# --------------------------------------------------------------------------- dead columns


def dead_fixture(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    w, sigma = layer(24, 64)
    sigma = sigma.double() * scale
    dead = [3, 10, 20, 41]
    sigma[[3, 10]] = 0  # never-active features
    sigma[:, [3, 10]] = 0
    sigma[[20, 41]] *= 1e-5  # near-dead: sigma_jj ~ 1e-10 of the mean
    sigma[:, [20, 41]] *= 1e-5
    return w, sigma, dead


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4, 1e6, 1e8])
@pytest.mark.parametrize(
    "options",
    [
        {"method": "gptq"},
        {"method": "gptq", "act_order": True},
        {"init": "w"},
        {"init": "rtn"},
        {"act_order": True},
        {"propagation": 1.0},
    ],
)
def test_dead_columns_keep_rtn(options, scale):
    """Dead columns are decoupled from the rest at every scale of Σ: they hold RTN(W) exactly.

    (Before the decoupling, ``N[k, dead] = Σ_k,dead`` was left undivided, and at
    Σ scales of 1e6-1e8 the live columns' steps dragged dead columns several
    grid levels away from RTN.)
    """
    w, sigma, dead = dead_fixture(scale)
    o = opts(**options)
    stats = sigma
    if o.propagation:  # the full-precision inputs differ, the dead channels stay dead
        stats = LayerStats(sigma, sigma * 0.9, 1.1 * quadratic_form(w, sigma))
    r = solve(w, stats, o)
    assert torch.isfinite(weight(r, o)).all()
    assert torch.equal(r.codes[:, dead], rtn(w, o).codes[:, dead])
    assert (weight(r, o)[:, dead] != 0).any(dim=0).all()
    assert err(w, r, sigma, o) < 0.5 * err(w, rtn(w, o), sigma, o)


@pytest.mark.parametrize("structure", ["unstructured", "columns"])
@pytest.mark.parametrize("scale", [1.0, 1e8])
def test_dead_columns_with_outliers_stay_close_to_w(structure, scale):
    w, sigma, dead = dead_fixture(scale)
    o = opts(outlier_fraction=0.05, outlier_structure=structure)
    r = solve(w, sigma, o)
    w_eff = weight(r, o)
    assert torch.isfinite(w_eff).all()
    step = r.scales.expand(-1, len(dead))
    assert ((w_eff - w)[:, dead].abs() <= step / 2 * 1.001).all()


def test_layer_without_tokens_is_rtn():
    w, _ = layer(16, 32)
    zero = torch.zeros(32, 32, dtype=torch.float64)
    o = opts(bits=4)
    for method in ("gptq", "quantease"):
        assert torch.equal(solve(w, zero, replace(o, method=method)).codes, rtn(w, o).codes)
    r = solve(w, zero, replace(o, outlier_fraction=0.05))
    assert torch.isfinite(weight(r, o)).all() and r.nnz() == round(0.05 * 16 * 32)
    assert layer_error(w, weight(r, o), zero) == 0.0


# --------------------------------------------------------------------------- outliers


@pytest.mark.parametrize(
    "structure,fraction,nnz", [("unstructured", 0.013, 60), ("columns", 0.05, 5 * 48)]
)
def test_outlier_budget_exact(structure, fraction, nnz):
    w, sigma = layer()  # 48 x 96
    o = opts(outlier_fraction=fraction, outlier_structure=structure, iters=4)
    r = quantease_outliers(w, Quadratic.of(sigma), o)
    assert r.nnz() == nnz
    assert torch.equal(r.outliers, r.outliers.half().float())
    if structure == "columns":
        assert int((r.outliers != 0).any(dim=0).sum()) == 5


def test_zero_outlier_budget_is_plain_quantease():
    w, sigma = layer()
    o = opts(bits=2, group_size=32)
    r = solve(w, sigma, replace(o, outlier_fraction=0.0001))  # round(0.0001 * 48 * 96) = 0
    assert r.outliers is None
    assert torch.equal(r.codes, solve(w, sigma, o).codes)


@pytest.mark.parametrize("structure", ["unstructured", "columns"])
def test_outliers_lower_the_error_monotonically(structure):
    w, sigma = layer()
    o = opts(bits=2)
    plain = err(w, solve(w, sigma, o), sigma, o)
    runs = [
        solve(w, sigma, replace(o, outlier_fraction=0.02, outlier_structure=structure, iters=k))
        for k in range(4)
    ]
    f = [err(w, r, sigma, o) for r in runs]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(f, f[1:])), f
    assert f[-1] < f[0] and f[-1] < plain


def misleading_support_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """A layer whose largest weights sit on quiet inputs, and whose loud inputs carry mid-size weights.

    Keeping the largest ``|W|`` exactly buys almost nothing (their inputs carry
    1e-4 of the energy); the outliers pay off where the loud inputs' weights
    round badly.
    """
    w, x = layer_and_inputs(48, 96, n=2048, seed=5)
    x[:, :] = torch.randn(96, 2048, generator=torch.Generator().manual_seed(6))
    x[:12] *= 1e-2  # quiet inputs ...
    w[:, :12] *= 8  # ... holding the largest weights
    x[40:56] *= 6  # loud inputs
    return w, x @ x.T


@pytest.mark.parametrize("structure", ["unstructured", "columns"])
def test_outlier_support_moves_to_where_the_error_is(structure):
    w, sigma = misleading_support_layer()
    o = opts(bits=2, outlier_fraction=0.05, outlier_structure=structure, iters=6)
    problem = Quadratic.of(sigma.double())
    budget = round(0.05 * 96) if structure == "columns" else round(0.05 * 48 * 96)
    start = initial_support(w, torch.ones(96), budget, structure)  # largest |W| (or norm)
    grid = fit(w, o.spec, start)
    # the same sweeps with the support frozen at its start
    cd = CoordinateDescent(w, problem, o.spec, grid, free=start)
    frozen, _ = coordinate_descent(cd, initial_point(w, problem, o, grid, start), iters=6)
    r = solve(w, sigma, o)
    moved = r.outliers != 0
    assert not torch.equal(moved, start)
    assert moved[:, 40:56].sum() > start[:, 40:56].sum()
    f_frozen = objective(w, frozen, sigma)
    assert objective(w, weight(r, o), sigma) < 0.8 * f_frozen


def test_outliers_move_materially():
    """The support step changes the objective materially, not by an ulp (the IHT step it
    replaces moved H by < 1% of one coordinate step and never changed the support)."""
    w, sigma = layer()
    o = opts(bits=2, outlier_fraction=0.02)
    start = solve(w, sigma, replace(o, iters=0))
    end = solve(w, sigma, replace(o, iters=5))
    assert (start.outliers != 0).sum() == (end.outliers != 0).sum()
    assert not torch.equal(start.outliers != 0, end.outliers != 0)
    assert err(w, end, sigma, o) < 0.9 * err(w, start, sigma, o)


def test_column_outliers_scored_by_output_energy():
    """Columns are picked by ``||W_:,j||^2 Σ_jj``: a loud input with modest weights beats a
    quiet one with large weights."""
    w = torch.ones(4, 6)
    w[:, 0] = 10.0  # largest weights, quiet input
    d = torch.tensor([1e-4, 1.0, 1.0, 50.0, 1.0, 1.0])
    mask = initial_support(w, d, 1, "columns")
    assert mask[:, 3].all() and not mask[:, 0].any()


# --------------------------------------------------------------------------- error propagation


def propagation_problem(seed: int = 0, q: int = 4, p: int = 6, n: int = 200):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(q, p, generator=g, dtype=torch.float64)
    x_fp = torch.randn(p, n, generator=g, dtype=torch.float64)
    x_fp[0] *= 4
    x_q = x_fp + 0.3 * torch.randn(p, n, generator=g, dtype=torch.float64)  # drifted inputs
    return w, x_fp, x_q, LayerStats(x_q @ x_q.T, x_fp @ x_q.T, float((w @ x_fp).square().sum()))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_propagation_objective_matches_activations(alpha):
    w, x_fp, x_q, stats = propagation_problem()
    v = w + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype)
    direct = alpha * float((w @ x_fp - v @ x_q).square().sum()) + (1 - alpha) * float(
        (w @ x_q - v @ x_q).square().sum()
    )
    assert Quadratic.of(stats, alpha, w).value(w, v) == pytest.approx(direct, rel=1e-10)
    cd = CoordinateDescent(w, Quadratic.of(stats, alpha, w), GridSpec(2), fit_grid(w, GridSpec(2)), dtype=torch.float64)
    assert cd.gradient(v)[1] == pytest.approx(direct, rel=1e-10)


def test_propagation_coordinate_step_is_exact_minimiser():
    """Brute force: every single-coordinate grid move from the CD fixed point raises the
    error-propagation objective ||W X_fp - V X_q||^2, computed from the activations."""
    w, x_fp, x_q, stats = propagation_problem(q=3, p=5)
    o = opts(bits=2, propagation=1.0, init="w", iters=50)
    r = solve(w.float(), stats, o)
    v = weight(r, o).double()

    def f(m):
        return float((w @ x_fp - m @ x_q).square().sum())

    s, z = (t.t() for t in column_grid(r.scales, r.zeros, o.spec, 5, torch.float64))
    best = f(v)
    for i in range(3):
        for j in range(5):
            for code in range(4):
                moved = v.clone()
                moved[i, j] = s[i, j] * (code - z[i, j])
                assert f(moved) >= best * (1 - 1e-9), (i, j, code)
    # and the fixed point beats what the layer-wise target finds, on the propagated objective
    classic = weight(solve(w.float(), stats, replace(o, propagation=0.0)), o).double()
    assert best <= f(classic) * (1 + 1e-9)


def test_propagation_target_helps_gptq_and_quantease():
    w, x = layer_and_inputs(48, 96, n=1024)
    x_q = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    stats = LayerStats((x_q @ x_q.T).double(), (x @ x_q.T).double(), float((w.double() @ x.double()).square().sum()))

    def f(r):
        return float((w.double() @ x.double() - weight(r, opts()).double() @ x_q.double()).square().sum())

    for method in ("gptq", "quantease"):
        o = opts(method=method)
        assert f(solve(w, stats, replace(o, propagation=1.0))) < 0.95 * f(solve(w, stats, o)), method


def test_propagation_zero_is_the_classic_objective():
    w, sigma = layer()
    stats = LayerStats(sigma.double(), 0.5 * sigma.double(), 2 * quadratic_form(w, sigma))
    for method in ("gptq", "quantease"):
        o = opts(method=method)
        assert torch.equal(solve(w, stats, o).codes, solve(w, sigma, o).codes)


# ------------------------------------------------------------ regularization


def test_shrink_is_per_column_damping():
    """``shrink`` s solves the problem with Σ_jj scaled by 1/(1-s) (per-column damping):
    the same minimiser, since scaling the whole objective changes nothing."""
    w, sigma = layer()
    s = 0.2
    sigma = sigma.double()
    damped = sigma + s / (1 - s) * torch.diag_embed(sigma.diagonal())
    a = solve(w, sigma, opts(shrink=s, init="rtn"))
    b = solve(w, damped, opts(init="rtn"))
    assert (a.codes != b.codes).float().mean() < 1e-3


@pytest.mark.parametrize("field", ["shrink", "cd_damp"])
def test_regularization_pulls_quantease_towards_rtn(field):
    """In the limit the separable ||W - W_hat||^2 term dominates, whose exact minimiser is RTN."""
    w, sigma = layer()
    o = opts(init="rtn")
    limit = {"shrink": 0.999999, "cd_damp": 1e6}[field]
    assert not torch.equal(solve(w, sigma, replace(o, **{field: 0.3})).codes, solve(w, sigma, o).codes)
    assert torch.equal(solve(w, sigma, replace(o, **{field: limit})).codes, rtn(w, o).codes)


# ------------------------------------------------------------ grid, objective, dispatch


@pytest.mark.parametrize("spec", SPECS)
def test_mse_grid_never_worse_than_min_max(spec):
    w, _ = layer()
    spec = opts(**spec).spec
    mask = top(w.abs(), 40, "unstructured")
    for exclude in (None, mask):
        keep = torch.ones_like(w) if exclude is None else (~exclude).float()

        def group_error(grid) -> torch.Tensor:
            w_hat = dequantize(quantize(w, *grid, spec), *grid, spec.group_size)
            e = (w_hat - w).abs() ** 2.4 * keep
            return e.view(w.shape[0], grid[0].shape[1], -1).sum(-1)

        mse, minmax = fit_grid_mse(w, spec, exclude), fit_grid(w, spec, exclude)
        assert torch.equal(mse[0], mse[0].half().float())
        assert (group_error(mse) <= group_error(minmax)).all()
        assert (group_error(mse) < group_error(minmax)).any()


def test_objective_matches_activations():
    g = torch.Generator().manual_seed(1)
    w, w_hat = torch.randn(2, 6, 10, generator=g)
    x = torch.randn(10, 50, generator=g)
    sigma = x @ x.T
    direct = float(((w.double() - w_hat.double()) @ x.double()).square().sum())
    assert objective(w, w_hat, sigma) == pytest.approx(direct, rel=1e-5)
    assert layer_error(w, w, sigma) == 0.0
    assert layer_error(w, torch.zeros_like(w), sigma) == pytest.approx(1.0)


def test_exact_matmul_restores_setting():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with exact_matmul():
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_solve_dispatch():
    w, sigma = layer(16, 32)
    o = opts()
    r = solve(w, None, opts(method="rtn", outlier_fraction=0.02))
    assert torch.equal(r.outliers, rtn(w, opts(outlier_fraction=0.02)).outliers)
    r = solve(w, None, opts(method="rtn", mse_grid=True))  # RTN on the MSE-searched grid
    assert torch.equal(r.scales, fit_grid_mse(w, o.spec)[0])
    assert torch.equal(r.codes, quantize(w, *fit_grid_mse(w, o.spec), o.spec))
    assert torch.equal(solve(w, sigma, opts(method="gptq")).codes, gptq(w, sigma, o).codes)
    assert torch.equal(solve(w, sigma, opts(iters=2)).codes, quantease(w, Quadratic.of(sigma), opts(iters=2)).codes)
    r = solve(w, sigma, opts(method="gptq", outlier_fraction=0.1, outlier_structure="columns"))
    assert r.nnz() == 3 * 16
    assert solve(w, sigma, opts(outlier_fraction=0.02)).nnz() == 10
    with pytest.raises(ValueError, match="needs calibration statistics"):
        solve(w, None, o)
    with pytest.raises(ValueError, match="method"):
        solve(w, sigma, opts(method="awq"))
    with pytest.raises(ValueError, match="unstructured outliers only"):
        solve(w, None, opts(method="rtn", outlier_fraction=0.1, outlier_structure="columns"))
    with pytest.raises(ValueError, match="outlier-structure"):
        solve(w, sigma, opts(outlier_fraction=0.1, outlier_structure="rows"))


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"shrink": 1.0}, "--shrink"),
        ({"shrink": -0.1}, "--shrink"),
        ({"propagation": 1.5}, "--propagation"),
        ({"propagation": -1.0}, "--propagation"),
        ({"cd_damp": -0.1}, "dampening"),
        ({"init": "zero"}, "--init"),
        ({"outlier_fraction": 1.0}, "--outlier-fraction"),
    ],
)
def test_bad_options_refused(bad, match):
    w, sigma = layer(16, 32)
    with pytest.raises(ValueError, match=match):
        solve(w, sigma, opts(**bad))
