"""Oracle tests of the layer solvers: GPTQ, QuantEase, outlier-aware QuantEase, and ``solve``.

Every check compares against something computed independently: round-to-nearest,
a naive coordinate-descent or OBS loop, brute force over a coordinate's grid,
or the objective evaluated directly in float64.
"""

from __future__ import annotations

import pytest
import torch

from qe_vllm.converters.gptq import gptq
from qe_vllm.converters.grid import (
    GridSpec,
    column_grid,
    dequantize,
    fit_grid,
    fit_grid_mse,
    quantize,
    round_to_grid,
)
from qe_vllm.converters.objective import exact_matmul, layer_error, objective
from qe_vllm.converters.outliers import largest, quantease_outliers
from qe_vllm.converters.quantease import coordinate_descent, initial_point, quantease
from qe_vllm.converters.rtn import rtn
from qe_vllm.converters.solvers import solve

SPECS = [GridSpec(3), GridSpec(2, 16), GridSpec(4, 32, sym=True)]


def layer(q: int = 48, p: int = 96, *, n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Heavy-tailed weights and a correlated sigma (low rank + noise, a few loud channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, 8, generator=g) @ torch.randn(8, n, generator=g)
    x += 0.3 * torch.randn(p, n, generator=g)
    x[:4] *= 10
    w = 0.05 * torch.randn(q, p, generator=g) * torch.exp(0.5 * torch.randn(q, p, generator=g))
    return w, x @ x.T


def weight(r, spec: GridSpec) -> torch.Tensor:
    return r.weight(spec.group_size)


def err(w: torch.Tensor, r, sigma: torch.Tensor, spec: GridSpec) -> float:
    return layer_error(w, weight(r, spec), sigma)


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
    eye = torch.eye(64)
    expected = rtn(w, spec).codes
    assert torch.equal(gptq(w, eye, spec).codes, expected)
    assert torch.equal(gptq(w, eye, spec, act_order=True).codes, expected)
    for init in ("w", "rtn", "gptq"):
        assert torch.equal(quantease(w, eye, spec, init=init).codes, expected), init


# --------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("spec", SPECS)
def test_gptq_matches_naive_obs_loop(spec):
    w, sigma = layer(16, 48, n=256)
    scales, zeros = fit_grid(w, spec)
    expected = naive_gptq(w, sigma, spec, scales, zeros, 0.01)
    for block_size in (1, 7, 128):
        r = gptq(w, sigma, spec, block_size=block_size)
        assert torch.equal(r.scales, scales) and torch.equal(r.zeros, zeros)  # static grid, from W
        assert torch.equal(r.codes, quantize(expected, scales, zeros, spec)), block_size


def test_gptq_act_order_and_rank_deficient_sigma():
    w, sigma = layer(32, 96, n=40)  # fewer tokens than features: singular sigma
    spec = GridSpec(3)
    base = err(w, rtn(w, spec), sigma, spec)
    for damp in (0.0, 0.01):
        for act_order in (False, True):
            r = gptq(w, sigma, spec, damp=damp, act_order=act_order)
            assert err(w, r, sigma, spec) < 0.5 * base, (damp, act_order)


def test_gptq_outliers_hold_compensated_values():
    w, sigma = layer()
    spec = GridSpec(3)
    mask = largest(w, 100, "unstructured")
    r = gptq(w, sigma, spec, outlier_mask=mask)
    assert torch.equal(r.outliers != 0, mask)
    assert torch.equal(r.outliers, r.outliers.half().float())
    assert torch.equal(dequantize(r.codes, r.scales, r.zeros, -1)[mask], torch.zeros(100))
    assert not torch.equal(r.outliers[mask], w[mask].half().float())  # they absorbed error
    assert err(w, r, sigma, spec) < err(w, gptq(w, sigma, spec), sigma, spec)


# --------------------------------------------------------------------------- QuantEase sweeps


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("init", ["w", "rtn", "gptq"])
def test_lazy_blocks_equal_naive_updates_bit_for_bit(spec, init):
    w, sigma = layer(16, 40, n=256)
    w, sigma = w.double(), sigma.double()
    scales, zeros = fit_grid(w, spec)
    w_hat, _ = initial_point(w.float(), sigma.float(), spec, (scales, zeros), init)
    w_hat = w_hat.double()
    for _ in range(4):
        expected = naive_sweep(w, sigma, spec, scales, zeros, w_hat)
        before = w_hat.clone()
        new, _ = coordinate_descent(w, sigma, spec, scales, zeros, w_hat, iters=1, block_size=8)
        assert torch.equal(new, expected)
        assert torch.equal(w_hat, before)  # the caller's iterate is never written
        w_hat = new


@pytest.mark.parametrize("spec", [GridSpec(2), GridSpec(3, sym=True)])
def test_converges_to_a_coordinatewise_minimum(spec):
    w, sigma = layer(5, 8, n=64, seed=3)
    w, sigma = w.double(), sigma.double()
    scales, zeros = fit_grid(w, spec)
    w_hat = w
    for _ in range(100):
        prev = w_hat
        w_hat, _ = coordinate_descent(w, sigma, spec, scales, zeros, w_hat, iters=1)
        if torch.equal(prev, w_hat):
            break
    else:
        pytest.fail("no fixed point within 100 sweeps")
    s, z = (t.t() for t in column_grid(scales, zeros, spec, 8, torch.float64))
    best = objective(w, w_hat, sigma)
    for i in range(5):
        for j in range(8):
            for code in range(spec.maxq + 1):
                moved = w_hat.clone()
                moved[i, j] = s[i, j] * (code - z[i, j])
                assert objective(w, moved, sigma) >= best * (1 - 1e-12), (i, j, code)


@pytest.mark.parametrize("dtype,slack", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("init", ["w", "gptq"])
def test_objective_never_increases(dtype, slack, init):
    w, sigma = layer()
    spec = GridSpec(2)
    scales, zeros = fit_grid(w, spec)
    w_hat, _ = initial_point(w, sigma, spec, (scales, zeros), init)
    f = []
    for _ in range(5):
        w_hat, history = coordinate_descent(
            w.to(dtype), sigma, spec, scales, zeros, w_hat, iters=1, tol=0.0
        )
        f.append(objective(w, w_hat, sigma))
        assert history[-1] == pytest.approx(f[-1], rel=1e-4)
    assert all(b <= a * (1 + slack) for a, b in zip(f, f[1:])), f
    _, history = coordinate_descent(w.to(dtype), sigma, spec, scales, zeros, w, iters=5, tol=0.0)
    assert all(b <= a * (1 + slack) for a, b in zip(history, history[1:])), history


def test_early_stop():
    w, sigma = layer()
    spec = GridSpec(3)
    scales, zeros = fit_grid(w, spec)
    start, _ = initial_point(w, sigma, spec, (scales, zeros), "gptq")
    _, history = coordinate_descent(w, sigma, spec, scales, zeros, start, iters=50, tol=0.5)
    assert len(history) == 2  # the first sweep already gains less than half
    _, history = coordinate_descent(w, sigma, spec, scales, zeros, start, iters=50, tol=0.0)
    assert len(history) < 51 and history[-1] == history[-2]


@pytest.mark.parametrize("spec", SPECS)
def test_quantease_beats_gptq_on_correlated_data(spec):
    w, sigma = layer()
    gptq_err = err(w, gptq(w, sigma, spec), sigma, spec)
    assert gptq_err < 0.5 * err(w, rtn(w, spec), sigma, spec)
    assert err(w, quantease(w, sigma, spec), sigma, spec) < 0.95 * gptq_err
    # never worse than its start, whatever the start's options and the damping of the sweeps
    for options in ({"act_order": True}, {"damp": 0.01}, {"mse_grid": True, "iters": 2}):
        r = quantease(w, sigma, spec, **options)
        fit = fit_grid_mse if "mse_grid" in options else fit_grid
        assert torch.equal(r.scales, fit(w, spec)[0])
        act_order = options.get("act_order", False)
        start = gptq(w, sigma, spec, act_order=act_order, grid=(r.scales, r.zeros))
        assert err(w, r, sigma, spec) <= err(w, start, sigma, spec), options


# --------------------------------------------------------------------------- dead columns


def dead_fixture() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    w, sigma = layer(24, 64)
    dead = [3, 10, 20, 41]
    sigma[[3, 10]] = 0  # never-active features
    sigma[:, [3, 10]] = 0
    sigma[[20, 41]] *= 1e-5  # near-dead: sigma_jj ~ 1e-10 of the mean
    sigma[:, [20, 41]] *= 1e-5
    return w, sigma, dead


@pytest.mark.parametrize(
    "method,options",
    [
        ("gptq", {}),
        ("gptq", {"act_order": True}),
        ("quantease", {"init": "w"}),
        ("quantease", {"init": "rtn"}),
        ("quantease", {"act_order": True}),
    ],
)
def test_dead_columns_keep_rtn(method, options):
    w, sigma, dead = dead_fixture()
    spec = GridSpec(3)
    r = solve(method, w, sigma, spec, **options)
    assert torch.isfinite(weight(r, spec)).all()
    assert torch.equal(r.codes[:, dead], rtn(w, spec).codes[:, dead])
    assert (weight(r, spec)[:, dead] != 0).any(dim=0).all()
    assert err(w, r, sigma, spec) < 0.5 * err(w, rtn(w, spec), sigma, spec)


@pytest.mark.parametrize("structure", ["unstructured", "columns"])
def test_dead_columns_with_outliers_stay_close_to_w(structure):
    w, sigma, dead = dead_fixture()
    spec = GridSpec(3)
    r = solve("quantease", w, sigma, spec, outlier_fraction=0.05, outlier_structure=structure)
    w_eff = weight(r, spec)
    assert torch.isfinite(w_eff).all()
    step = r.scales.expand(-1, len(dead))
    assert ((w_eff - w)[:, dead].abs() <= step / 2 * 1.001).all()


def test_layer_without_tokens_is_rtn():
    w, _ = layer(16, 32)
    spec = GridSpec(4)
    zero = torch.zeros(32, 32)
    for method in ("gptq", "quantease"):
        assert torch.equal(solve(method, w, zero, spec).codes, rtn(w, spec).codes)
    r = solve("quantease", w, zero, spec, outlier_fraction=0.05)
    assert torch.isfinite(weight(r, spec)).all() and r.nnz() == round(0.05 * 16 * 32)
    assert layer_error(w, weight(r, spec), zero) == 0.0


# --------------------------------------------------------------------------- outliers


@pytest.mark.parametrize(
    "structure,fraction,nnz", [("unstructured", 0.013, 60), ("columns", 0.05, 5 * 48)]
)
def test_outlier_budget_exact(structure, fraction, nnz):
    w, sigma = layer()  # 48 x 96
    spec = GridSpec(3)
    r = quantease_outliers(w, sigma, spec, fraction, structure=structure, iters=4)
    assert r.nnz() == nnz
    assert torch.equal(r.outliers, r.outliers.half().float())
    if structure == "columns":
        assert int((r.outliers != 0).any(dim=0).sum()) == 5


def test_zero_outlier_budget_is_plain_quantease():
    w, sigma = layer()
    spec = GridSpec(2, 32)
    r = quantease_outliers(w, sigma, spec, 0.0001)  # round(0.0001 * 48 * 96) = 0
    assert r.outliers is None
    assert torch.equal(r.codes, quantease(w, sigma, spec).codes)


@pytest.mark.parametrize("structure", ["unstructured", "columns"])
def test_outliers_lower_the_error_monotonically(structure):
    w, sigma = layer()
    spec = GridSpec(2)
    plain = err(w, quantease(w, sigma, spec), sigma, spec)
    runs = [
        quantease_outliers(w, sigma, spec, 0.02, structure=structure, iters=k, tol=0.0)
        for k in range(4)
    ]
    f = [err(w, r, sigma, spec) for r in runs]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(f, f[1:])), f
    assert f[-1] < f[0] and f[-1] < plain


def test_outliers_move_with_iht():
    w, sigma = layer()
    spec = GridSpec(2)
    start = quantease_outliers(w, sigma, spec, 0.02, iters=0).outliers
    end = quantease_outliers(w, sigma, spec, 0.02, iters=5).outliers
    assert not torch.equal(start, end)  # the H-step does act (reference defect D1 froze everything)


# ------------------------------------------------------------ grid, objective, dispatch


@pytest.mark.parametrize("spec", SPECS)
def test_mse_grid_never_worse_than_min_max(spec):
    w, _ = layer()
    mask = largest(w, 40, "unstructured")
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
    spec = GridSpec(3)
    r = solve("rtn", w, None, spec, outlier_fraction=0.02)
    assert torch.equal(r.outliers, rtn(w, spec, 0.02).outliers)
    r = solve("rtn", w, None, spec, mse_grid=True)  # RTN on the MSE-searched grid
    assert torch.equal(r.scales, fit_grid_mse(w, spec)[0])
    assert torch.equal(r.codes, quantize(w, *fit_grid_mse(w, spec), spec))
    assert torch.equal(solve("gptq", w, sigma, spec).codes, gptq(w, sigma, spec).codes)
    r = solve("quantease", w, sigma, spec, iters=2)
    assert torch.equal(r.codes, quantease(w, sigma, spec, iters=2).codes)
    r = solve("gptq", w, sigma, spec, outlier_fraction=0.1, outlier_structure="columns")
    assert r.nnz() == 3 * 16
    assert solve("quantease", w, sigma, spec, outlier_fraction=0.02).nnz() == 10
    with pytest.raises(ValueError, match="needs sigma"):
        solve("quantease", w, None, spec)
    with pytest.raises(ValueError, match="method"):
        solve("awq", w, sigma, spec)
    with pytest.raises(ValueError, match="unstructured outliers only"):
        solve("rtn", w, None, spec, outlier_fraction=0.1, outlier_structure="columns")
    with pytest.raises(ValueError, match="structure"):
        solve("quantease", w, sigma, spec, outlier_fraction=0.1, outlier_structure="rows")


def test_cd_damp_pulls_quantease_towards_rtn():
    """``cd_damp`` adds ``cd_damp * mean(diag sigma) * I`` to the sweeps' sigma only: passed
    through by ``solve``, and in the limit the separable ``|W - W_hat|^2`` term dominates,
    whose exact minimiser is round-to-nearest."""
    w, sigma = layer()
    spec = GridSpec(3)
    via_solve = solve("quantease", w, sigma, spec, cd_damp=0.3)
    assert torch.equal(via_solve.codes, quantease(w, sigma, spec, damp=0.3).codes)
    assert not torch.equal(via_solve.codes, solve("quantease", w, sigma, spec).codes)
    assert torch.equal(solve("quantease", w, sigma, spec, cd_damp=1e6).codes, rtn(w, spec).codes)
