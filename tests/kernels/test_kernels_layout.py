"""Kernel-side layout, pure-torch CPU path and dispatcher: no Triton needed.

The layout must be a lossless re-encoding of the canonical checkpoint tensors
(``qe_vllm.format``); the CPU path (``kernels/torch_linear.py``, what vLLM calls on CPU)
must equal the float32 reference and trace under ``torch.compile(fullgraph=True)``
without specialising on the token count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.env import TESTS
from helpers.layers import error_bound, random_layer
from qe_vllm.format import QZEROS, SCALES, csr_rows, dense_weight, expand_groups, num_groups
from qe_vllm.kernels import dispatch
from qe_vllm.kernels.dispatch import KernelConfig, candidate_configs, config_key, default_config
from qe_vllm.kernels.layout import (
    MAX_TILE,
    OUTLIER_BLOCK,
    QuantEaseWeights,
    decode_entries,
    dequantize_weights,
    outlier_coordinates,
    pack_weights,
    to_canonical,
)
from qe_vllm.kernels.reference import reference_linear
from qe_vllm.kernels.torch_linear import quantease_linear_torch

N, K = 72, 200  # not multiples of any tile


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.02])
def test_layout_round_trip_is_exact(bits: int, group_size: int, sym: bool, density: float) -> None:
    tensors, cfg = random_layer(N, K, bits, group_size, sym, density, seed=bits + group_size)
    w = pack_weights(tensors, cfg, K, tile_n=32, tile_k=64)
    back = to_canonical(w)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_layout_round_trip_bf16_outliers_and_default_tiles() -> None:
    tensors, cfg = random_layer(300, 520, 3, 64, False, 0.01, seed=3, outlier_dtype=torch.bfloat16)
    w = pack_weights(tensors, cfg, 520)
    assert w.outliers_bf16
    back = to_canonical(w)
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name


def test_layout_shapes_and_buckets() -> None:
    tensors, cfg = random_layer(N, K, 3, 64, False, 0.02, seed=1, hot_block=(12, 16))
    w = pack_weights(tensors, cfg, K, tile_n=32, tile_k=64)
    assert (
        w.qweight.shape == (224 // 16, N)
        and w.qweight_hi is not None
        and w.qweight_hi.shape == (224 // 32, N)
    )
    assert w.scales.shape == (4, N) and w.zero_term is not None and w.zero_term.shape == (4, N)
    assert w.bucket_ptr is not None and w.outliers is not None
    assert w.bucket_ptr.shape == (3 * 4 + 1,)
    sizes = w.bucket_ptr.diff()
    assert int(w.bucket_ptr[0]) == 0 and bool((sizes % OUTLIER_BLOCK == 0).all())
    assert (
        int(sizes[0]) >= 9 * 16
    )  # hot block: 12 rows (3 emptied) x 16 columns in bucket (tile 0, chunk 0)
    k_local, n_local, values = decode_entries(w.outliers, bf16=False)
    assert int(k_local.max()) < 64 and int(n_local.max()) < 32
    rows, _, _ = outlier_coordinates(w)
    assert rows.numel() == tensors["outlier_col_idx"].numel() == int((values != 0).sum())
    nnz_per_row = torch.bincount(csr_rows(tensors["outlier_row_ptr"]), minlength=N)
    assert bool((nnz_per_row[::5] == 0).all())  # rows without outliers exist


def test_symmetric_layer_stores_no_zeros_and_outlier_free_layer_no_buckets() -> None:
    tensors, cfg = random_layer(N, K, 4, -1, True, 0.0)
    w = pack_weights(tensors, cfg, K)
    assert w.zero_term is None and w.qweight_hi is None and not w.has_outliers
    assert w.qweight.shape == (224 // 8, N) and w.scales.shape == (1, N)


@pytest.mark.parametrize(
    "bits,group_size,sym", [(2, 32, False), (3, -1, True), (4, 128, False), (8, 64, False)]
)
def test_kernel_layout_dequantizes_to_the_canonical_weight(
    bits: int, group_size: int, sym: bool
) -> None:
    tensors, cfg = random_layer(N, K, bits, group_size, sym, 0.02, seed=7)
    w = pack_weights(tensors, cfg, K, tile_n=32, tile_k=64)
    reference = dense_weight(tensors, cfg, K)
    # the only difference is the fp16 rounding of the folded zero term -zero*scale
    fold = (
        0.0
        if sym
        else 2.0**-11
        * expand_groups(tensors[QZEROS].float() * tensors[SCALES].float(), group_size, K)
    )
    assert bool(((dequantize_weights(w).t() - reference).abs() <= fold + 1e-7).all())


@pytest.mark.parametrize("tile", [8, 48, 2 * MAX_TILE])
def test_pack_rejects_bad_tiles(tile: int) -> None:
    tensors, cfg = random_layer(N, K, 4, 32, True, 0.0)
    with pytest.raises(ValueError, match="power of two"):
        pack_weights(tensors, cfg, K, tile_n=tile)


# --------------------------------------------------------------------------- CPU torch path


def _torch_path_args(tensors: dict[str, torch.Tensor]) -> tuple:
    """Runtime tensors of the CPU path: outliers as flat indices ``row * K + col``."""
    if "outlier_row_ptr" in tensors:
        index = csr_rows(tensors["outlier_row_ptr"]) * K + tensors["outlier_col_idx"].long()
        values = tensors["outlier_val"]
    else:
        index, values = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float16)
    return (tensors["qweight"], tensors["scales"], tensors.get("qzeros"), index, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "bits,group_size,sym,density", [(3, 64, False, 0.02), (4, -1, True, 0.005), (2, 32, True, 0.0)]
)
def test_torch_path_matches_reference(
    dtype: torch.dtype, bits: int, group_size: int, sym: bool, density: float
) -> None:
    tensors, cfg = random_layer(N, K, bits, group_size, sym, density, seed=11)
    x = torch.randn(2, 5, K).to(dtype)  # leading dims pass through
    y = quantease_linear_torch(
        x, *_torch_path_args(tensors), bits=bits, group_size=group_size, in_features=K
    )
    assert y.shape == (2, 5, N) and y.dtype == dtype
    y_ref = reference_linear(x.reshape(-1, K), tensors, cfg, K)
    bound = error_bound(x.reshape(-1, K), tensors, cfg, K, y_ref)
    assert bool(((y.reshape(-1, N).float() - y_ref).abs() <= bound).all())


def test_torch_path_compiles_fullgraph_without_specialising_on_m() -> None:
    tensors, _ = random_layer(N, K, 3, 32, False, 0.02, seed=5)
    args = _torch_path_args(tensors)
    bias = torch.randn(N)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return quantease_linear_torch(x, *args, bits=3, group_size=32, in_features=K, bias=bias)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    compiled(torch.randn(3, K))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in (17, 130):
            x = torch.randn(m, K)
            torch.testing.assert_close(compiled(x), forward(x))


# --------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize(
    "n,k,group_size", [(72, 200, 32), (4096, 4096, 128), (28672, 4096, 128), (4096, 14336, 64)]
)
@pytest.mark.parametrize("tile_n", [32, 64, 256])
def test_default_and_candidate_configs_are_launchable(
    n: int, k: int, group_size: int, tile_n: int
) -> None:
    meta = torch.device("meta")  # configs depend on shapes only
    w = QuantEaseWeights(
        qweight=torch.empty(k // 8, n, dtype=torch.int32, device=meta),
        qweight_hi=None,
        scales=torch.empty(num_groups(group_size, k), n, dtype=torch.float16, device=meta),
        zero_term=None,
        bucket_ptr=torch.empty(1, dtype=torch.int32, device=meta),
        outliers=torch.empty(16, dtype=torch.int32, device=meta),
        bits=4,
        group_size=group_size,
        in_features=k,
        tile_n=tile_n,
        tile_k=128,
        outliers_bf16=False,
    )
    for m in (1, 2, 3, 4, 8, 16, 17, 64, 130, 512, 2048):
        for c in [default_config(m, w, num_sms=132)] + candidate_configs(m, w):
            if c.kind == "dequant":
                assert w.tile_k % c.block_k == 0
            else:
                assert c.block_n % tile_n == 0
            if c.kind == "gemm":
                assert min(c.block_m, c.block_k) >= 16
        kind = default_config(m, w, num_sms=132).kind
        assert kind == (
            "gemv"
            if m <= dispatch.GEMV_MAX_M
            else "dequant"
            if m >= dispatch.DEQUANT_MIN_M
            else "gemm"
        )


def test_config_cache_round_trips_through_json(tmp_path, monkeypatch) -> None:
    tensors, cfg = random_layer(N, K, 4, 32, True, 0.0)
    w = pack_weights(tensors, cfg, K)
    dispatch.clear_configs()
    tuned = KernelConfig("gemv", 4, 256, 32, 8, 2, 1)
    dispatch.set_config(config_key(3, w), tuned)
    assert dispatch.get_config(4, w, torch.device("cpu")) == tuned  # same M bucket
    path = tmp_path / "configs.json"
    dispatch.save_configs(path)
    assert json.loads(path.read_text())[0]["key"] == [4, N, K, 4, 32]
    dispatch.clear_configs()
    monkeypatch.setattr(dispatch, "_env_loaded", False)
    monkeypatch.setenv(dispatch.CONFIG_ENV, str(path))
    assert dispatch.get_config(3, w, torch.device("cpu")) == tuned
    dispatch.clear_configs()


def test_kernels_work_without_triton_and_never_import_vllm() -> None:
    """The CPU path and the op's torch fallback need neither Triton nor vLLM."""
    code = f"""
import sys
sys.modules["triton"] = None  # any import of triton now raises ImportError
import torch
from qe_vllm.kernels import dispatch, layout, ops, reference
sys.path.append({str(TESTS)!r})  # after qe_vllm: tests/qe_vllm must not shadow the package
from helpers import layers
assert "vllm" not in sys.modules
tensors, cfg = layers.random_layer(72, 200, 3, 64, False, 0.02)
w = layout.pack_weights(tensors, cfg, 200)
x = torch.randn(3, 200)
y = ops.quantease_linear(x, w)
y_ref = reference.reference_linear(x, tensors, cfg, 200)
assert bool(((y - y_ref).abs() <= layers.error_bound(x, tensors, cfg, 200, y_ref)).all())
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_pack_accepts_unsorted_coo_outliers() -> None:
    """A loader holding (rows, cols, values) after TP slicing gets the same layout as from CSR."""
    tensors, cfg = random_layer(N, K, 4, 64, False, 0.02, seed=12)
    from_csr = pack_weights(tensors, cfg, K, tile_n=32, tile_k=64)
    rows, cols = csr_rows(tensors["outlier_row_ptr"]), tensors["outlier_col_idx"]
    perm = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))
    dense_only = {name: t for name, t in tensors.items() if not name.startswith("outlier_")}
    coo = (rows[perm].to(torch.int32), cols[perm], tensors["outlier_val"][perm])
    from_coo = pack_weights(dense_only, cfg, K, outliers=coo, tile_n=32, tile_k=64)
    assert torch.equal(from_coo.bucket_ptr, from_csr.bucket_ptr)
    assert torch.equal(dequantize_weights(from_coo), dequantize_weights(from_csr))
    for name, t in tensors.items():
        assert torch.equal(to_canonical(from_coo)[name], t), name
