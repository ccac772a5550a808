"""Triton kernels vs the float32 reference, and the ``quantease::linear`` custom op.

Without a GPU every kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, set
by tests/conftest.py before anything imports triton, checked below), in fp16: the
interpreter's bf16 arithmetic is wrong. On a GPU the same tests run natively and add bf16
activations.

Every kernel path is checked on random layers against ``reference.reference_linear``
(float32, from the canonical tensors) with the per-element bound of
``helpers.layers.error_bound`` (fp16: roundings of weights, folded zeros and outputs at
u = 2**-11, 6-sigma; bf16: u = 2**-8). Outputs are poisoned with NaN before the call so
an element a kernel forgets to write fails. Shapes are not multiples of any tile
(K=200, N=72); layers use small outlier tiles (32 x 64) so one program spans several
buckets, a bucket holds many entries, some rows hold none, and edge programs cover
tiles past N.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it without a GPU"

import pytest

from helpers.layers import error_bound, random_layer
from qe_vllm.format import QWEIGHT, QZEROS, SCALES
from qe_vllm.kernels.dispatch import KernelConfig, get_config, launch, m_bucket
from qe_vllm.kernels.layout import QuantEaseWeights, dequantize_weights, pack_weights
from qe_vllm.kernels.ops import quantease_linear
from qe_vllm.kernels.reference import reference_linear
from qe_vllm.kernels.triton_dequant import dequantize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]
N, K = 72, 200
TILE_N, TILE_K = 32, 64
MS = (1, 3, 17, 130)
DENSITIES = (0.0, 0.005, 0.02)
GROUPS = (-1, 32, 64, 128)
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _path_config(path: str, m: int) -> KernelConfig:
    """One config per kernel path; block_k 64 with group 32 exercises per-row scale loads."""
    if path == "gemv":
        return KernelConfig(
            "gemv", block_m=min(16, m_bucket(m)), block_n=128, block_k=32, split_k=2
        )
    if path == "gemm_splitk":
        return KernelConfig(
            "gemm", block_m=16 if m <= 16 else 32, block_n=64, block_k=64, split_k=3
        )
    if path == "gemm":
        return KernelConfig(
            "gemm", block_m=32 if m <= 32 else 64, block_n=128, block_k=64, split_k=1
        )
    return KernelConfig("dequant", block_k=64)


_GUARD = 1024
_guard_bands: list[tuple[int, int]] = []  # byte ranges [start, end) no kernel may touch


def _guarded(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a view into a buffer whose head and tail are poisoned (NaN; -1 for integers).

    Under the interpreter every load, store and atomic is checked against these guard
    bands (:func:`_bounds_checked`), so a kernel touching memory just before or past a
    tensor fails here instead of faulting, or silently reading garbage, on a GPU.
    """
    poison = float("nan") if t.is_floating_point() else -1
    buf = torch.full((t.numel() + 2 * _GUARD,), poison, dtype=t.dtype, device=t.device)
    buf[_GUARD : _GUARD + t.numel()] = t.flatten()
    start, size = buf.data_ptr(), t.element_size()
    _guard_bands.append((start, start + _GUARD * size))
    _guard_bands.append(
        (start + (_GUARD + t.numel()) * size, start + (2 * _GUARD + t.numel()) * size)
    )
    return buf[_GUARD : _GUARD + t.numel()].view(t.shape)


class _BoundsCheckedMemory:
    """Stands in for the interpreter's native memory module, refusing guard-band accesses."""

    def __init__(self, native: object) -> None:
        self._native = native

    def __getattr__(self, name: str) -> object:
        return getattr(self._native, name)

    @staticmethod
    def _check(ptrs: np.ndarray, mask: np.ndarray) -> None:
        active = np.broadcast_to(ptrs, mask.shape)[mask.astype(bool)]
        for start, end in _guard_bands:
            hit = (active >= start) & (active < end)
            assert not hit.any(), f"kernel accessed {int(hit.sum())} addresses outside its tensors"

    def load(
        self, ptrs: np.ndarray, mask: np.ndarray, other: np.ndarray, dtype: type
    ) -> np.ndarray:
        self._check(ptrs, mask)
        return self._native.load(ptrs, mask, other, dtype)

    def store(self, ptrs: np.ndarray, value: np.ndarray, mask: np.ndarray) -> None:
        self._check(ptrs, mask)
        return self._native.store(ptrs, value, mask)

    def atomic_rmw(
        self, op: object, ptrs: np.ndarray, value: np.ndarray, mask: np.ndarray, sem: object
    ) -> np.ndarray:
        self._check(ptrs, mask)
        return self._native.atomic_rmw(op, ptrs, value, mask, sem)


@pytest.fixture(autouse=True)
def _bounds_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    _guard_bands.clear()
    if DEVICE.type == "cpu":
        from triton.runtime import interpreter

        monkeypatch.setattr(
            interpreter, "_interpreter", _BoundsCheckedMemory(interpreter._interpreter)
        )
    yield
    _guard_bands.clear()


def _layer(
    bits: int, group_size: int, sym: bool, density: float, seed: int, n: int = N, k: int = K, **kw
) -> tuple[dict[str, torch.Tensor], object, QuantEaseWeights]:
    tensors, cfg = random_layer(n, k, bits, group_size, sym, density, seed=seed, **kw)
    w = pack_weights(
        {name: t.to(DEVICE) for name, t in tensors.items()}, cfg, k, tile_n=TILE_N, tile_k=TILE_K
    )
    for f in dataclasses.fields(w):
        if isinstance(getattr(w, f.name), torch.Tensor):
            setattr(w, f.name, _guarded(getattr(w, f.name)))
    return tensors, cfg, w


def _input(m: int, k: int, dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return _guarded(x.to(DEVICE))


def _check(y: torch.Tensor, x: torch.Tensor, tensors: dict[str, torch.Tensor], cfg, k: int) -> None:
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) output elements"
    x_cpu = x.cpu()
    y_ref = reference_linear(x_cpu, tensors, cfg, k)
    bound = error_bound(x_cpu, tensors, cfg, k, y_ref)
    err = (y.cpu().float() - y_ref).abs()
    worst = (err / bound).max()
    assert bool((err <= bound).all()), (
        f"max |err| {float(err.max()):.3g}, {float(worst):.2f}x the bound"
    )


def _cases() -> list[tuple[str, int, int, bool, float, int]]:
    """A covering design: per path, every (bits, group, sym); density and M rotate so each
    (path, bits) sees every M and each path every density."""
    cases = []
    for p, path in enumerate(("gemv", "gemm_splitk", "gemm", "dequant")):
        for bits in (2, 3, 4):
            for g, group in enumerate(GROUPS):
                for sym in (True, False):
                    r = g + bits + p + 2 * sym
                    cases.append((path, bits, group, sym, DENSITIES[r % 3], MS[r % 4]))
    cases += [
        ("gemv", 8, 32, False, 0.02, 1),
        ("gemm", 8, -1, True, 0.005, 17),
        ("dequant", 8, 64, False, 0.02, 130),
    ]
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path,bits,group_size,sym,density,m", _cases())
def test_kernel_path_matches_reference(
    path: str, bits: int, group_size: int, sym: bool, density: float, m: int, dtype: torch.dtype
) -> None:
    tensors, cfg, w = _layer(bits, group_size, sym, density, seed=100 * bits + group_size + m)
    x = _input(m, K, dtype, seed=m)
    out = torch.full((m, N), float("nan"), dtype=dtype, device=DEVICE)
    y = launch(x, w, _path_config(path, m), out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, tensors, cfg, K)


@pytest.mark.parametrize("path", ["gemv", "gemm_splitk", "gemm", "dequant"])
def test_multi_tile_shape_with_edge_programs(path: str) -> None:
    """N=200, K=520: several N-blocks and K-splits, each last one partial; bf16 outlier values."""
    n, k, m = 200, 520, 5
    tensors, cfg, w = _layer(3, 64, False, 0.01, seed=2, n=n, k=k, outlier_dtype=torch.bfloat16)
    x = _input(m, k)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    _check(launch(x, w, _path_config(path, m), out=out), x, tensors, cfg, k)


@pytest.mark.parametrize("bits,group_size,sym", [(2, 32, True), (3, 64, False), (4, -1, False)])
def test_dequantize_kernel_matches_torch_layout_reference(
    bits: int, group_size: int, sym: bool
) -> None:
    _, _, w = _layer(bits, group_size, sym, 0.02, seed=4)
    out = torch.full((K, N), float("nan"), dtype=torch.float16, device=DEVICE)
    scratch = dequantize(w, torch.float16, block_k=32, out=out)
    expected = dequantize_weights(w, torch.float32)
    # one rounding to fp16 of the float32 value (dense + outlier)
    assert bool(((scratch.float() - expected).abs() <= 2.0**-11 * expected.abs() + 1e-7).all())


def test_outliers_change_the_output_beyond_the_bound() -> None:
    """The bound is tight enough that a kernel dropping its outliers would fail."""
    tensors, cfg = random_layer(N, K, 3, 64, False, 0.005, seed=9)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1)).half()
    dense_only = {name: tensors[name] for name in (QWEIGHT, SCALES, QZEROS)}
    y_ref = reference_linear(x, tensors, cfg, K)
    effect = (y_ref - reference_linear(x, dense_only, cfg, K)).abs()
    assert bool((effect > error_bound(x, tensors, cfg, K, y_ref)).sum() >= N)


@pytest.mark.parametrize(
    "m,kind", [(1, "gemv"), (3, "gemv"), (17, "gemm"), (130, "gemm"), (1100, "dequant")]
)
def test_op_dispatches_every_regime(m: int, kind: str) -> None:
    tensors, cfg, w = _layer(4, 128, False, 0.02, seed=6)
    assert get_config(m, w, DEVICE).kind == kind
    x = _input(m, K, seed=2)
    bias = torch.randn(N, dtype=torch.float16, device=DEVICE)
    y = quantease_linear(x.view(1, m, K), w, bias)
    assert y.shape == (1, m, N) and y.dtype == torch.float16
    _check(y.view(m, N) - bias, x, tensors, cfg, K)


def test_custom_op_passes_opcheck() -> None:
    _, _, w = _layer(3, 32, False, 0.02, seed=8)
    x = _input(3, K)
    torch.library.opcheck(
        torch.ops.quantease.linear.default,
        (x, *w.op_args()),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_custom_op_compiles_fullgraph() -> None:
    tensors, cfg, w = _layer(2, 64, True, 0.005, seed=10)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return quantease_linear(x, w)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    for m in (3, 17):
        x = _input(m, K)
        _check(compiled(x), x, tensors, cfg, K)
