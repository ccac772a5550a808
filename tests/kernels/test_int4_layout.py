"""The 4-bit layouts (``kernels/int4_layout.py``) and the CSR outlier product.

Pure torch, no vLLM. Both layouts must give back the checkpoint's float32 weights
exactly: torch's int4pack GEMM is run on an identity matrix in float32 (its weights come
out as the product), the compressed-tensors layout is decoded with its documented
meaning. The outlier product must equal the dense sparse matrix's, in eager mode and
under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import pytest
import torch

from helpers.layers import random_layer
from qe_vllm.format import COL_IDX, QWEIGHT, QZEROS, ROW_PTR, SCALES, VALUES, csr_rows, dense_weight
from qe_vllm.kernels.int4_layout import (
    int4_group_size,
    int4pack_group_size,
    int4pack_linear,
    to_int4_layout,
    to_int4pack,
)
from qe_vllm.kernels.torch_linear import add_csr_outliers


def decode(layout, in_features: int) -> torch.Tensor:
    """float32 ``W [N, K]`` from the layout, as compressed-tensors defines it."""
    shifts = torch.arange(8, dtype=torch.int32) * 4
    codes = ((layout.weight_packed.unsqueeze(-1) >> shifts) & 15).flatten(1)[:, :in_features]
    width = in_features if layout.group_size == -1 else layout.group_size
    scales = layout.weight_scale.float().repeat_interleave(width, dim=1)
    if layout.weight_zero_point is None:
        zeros = torch.full_like(scales, 8.0)
    else:
        packed = layout.weight_zero_point.t()  # [G, N / 8], packed along N
        z = ((packed.unsqueeze(-1) >> shifts) & 15).flatten(1).t()  # [N, G]
        zeros = z.float().repeat_interleave(width, dim=1)
    return scales * (codes.float() - zeros)


@pytest.mark.parametrize(
    "bits, group_size, sym, in_features, expected_group",
    [
        (4, 64, False, 256, 64),
        (4, 128, True, 96, 32),  # one partial group -> gcd(128, 96)
        (3, 64, False, 96, 32),  # 3-bit codes straddle words; partial last group
        (3, 32, True, 128, 32),
        (2, -1, True, 64, -1),  # per channel
        (2, 16, False, 64, 16),
    ],
)
def test_layout_decodes_to_checkpoint_weights(
    bits: int, group_size: int, sym: bool, in_features: int, expected_group: int
) -> None:
    tensors, cfg = random_layer(40, in_features, bits, group_size, sym, density=0.0, seed=bits)
    layout = to_int4_layout(
        tensors[QWEIGHT], tensors[SCALES], tensors.get(QZEROS), bits=bits,
        group_size=group_size, in_features=in_features, scale_dtype=torch.float32,
    )
    assert layout.group_size == expected_group == int4_group_size(group_size, in_features)
    assert layout.symmetric == sym
    assert layout.weight_packed.shape == (40, in_features // 8)
    assert torch.equal(decode(layout, in_features), dense_weight(tensors, cfg, in_features))


@pytest.mark.parametrize(
    "bits, group_size, sym, in_features, expected_group",
    [
        (4, 128, False, 256, 128),  # zero term s * (8 - z)
        (4, 128, False, 576, 64),  # SmolLM2: partial last group -> 64
        (4, 64, True, 128, 64),
        (3, 128, False, 96, 32),  # codes re-centred on 8: zero term 0
        (2, -1, True, 1536, 256),  # per channel -> widest accepted group
    ],
)
def test_int4pack_weights_are_the_checkpoint_weights(
    bits: int, group_size: int, sym: bool, in_features: int, expected_group: int
) -> None:
    tensors, cfg = random_layer(48, in_features, bits, group_size, sym, density=0.0, seed=bits)
    packed = to_int4pack(
        tensors[QWEIGHT], tensors[SCALES], tensors.get(QZEROS), bits=bits,
        group_size=group_size, in_features=in_features, dtype=torch.float32,
    )
    assert packed.group_size == expected_group == int4pack_group_size(group_size, in_features)
    eye = torch.eye(in_features)
    weights_t = int4pack_linear(eye, packed.weight, packed.scales_and_zeros, packed.group_size)
    assert torch.equal(weights_t.t(), dense_weight(tensors, cfg, in_features))
    x = torch.randn(2, 3, in_features).to(torch.bfloat16)  # leading dims pass through
    bf16 = to_int4pack(
        tensors[QWEIGHT], tensors[SCALES], tensors.get(QZEROS), bits=bits,
        group_size=group_size, in_features=in_features, dtype=torch.bfloat16,
    )
    y = int4pack_linear(x, bf16.weight, bf16.scales_and_zeros, bf16.group_size)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    y_ref = x.float() @ dense_weight(tensors, cfg, in_features).t()
    torch.testing.assert_close(y.float(), y_ref, rtol=0.02, atol=0.02 * float(y_ref.abs().max()))


def test_int4pack_refusals() -> None:
    odd, _ = random_layer(40, 64, 4, 32, False, density=0.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        to_int4pack(odd[QWEIGHT], odd[SCALES], odd[QZEROS], bits=4, group_size=32,
                    in_features=64, dtype=torch.bfloat16)
    narrow, _ = random_layer(32, 80, 4, 16, False, density=0.0)
    with pytest.raises(ValueError, match="no group width"):
        to_int4pack(narrow[QWEIGHT], narrow[SCALES], narrow[QZEROS], bits=4, group_size=16,
                    in_features=80, dtype=torch.bfloat16)
    wide, _ = random_layer(32, 64, 8, 32, False, density=0.0)
    with pytest.raises(ValueError, match="8-bit"):
        to_int4pack(wide[QWEIGHT], wide[SCALES], wide[QZEROS], bits=8, group_size=32,
                    in_features=64, dtype=torch.bfloat16)


def test_forced_group_and_refusals() -> None:
    tensors, cfg = random_layer(16, 128, 4, 64, False, density=0.0)
    args = (tensors[QWEIGHT], tensors[SCALES], tensors[QZEROS])
    layout = to_int4_layout(*args, bits=4, group_size=64, in_features=128,
                            scale_dtype=torch.float32, int4_group=16)
    assert layout.weight_scale.shape == (16, 8)
    assert torch.equal(decode(layout, 128), dense_weight(tensors, cfg, 128))
    with pytest.raises(ValueError, match="do not split"):
        to_int4_layout(*args, bits=4, group_size=64, in_features=128,
                       scale_dtype=torch.float32, int4_group=128)
    wide, _ = random_layer(16, 64, 8, 32, False, density=0.0)
    with pytest.raises(ValueError, match="8-bit"):
        to_int4_layout(wide[QWEIGHT], wide[SCALES], wide[QZEROS], bits=8, group_size=32,
                       in_features=64, scale_dtype=torch.float32)
    odd, _ = random_layer(12, 64, 4, 32, False, density=0.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        to_int4_layout(odd[QWEIGHT], odd[SCALES], odd[QZEROS], bits=4, group_size=32,
                       in_features=64, scale_dtype=torch.float32)


def _outliers(n: int = 48, k: int = 80, seed: int = 3) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    tensors, _ = random_layer(n, k, 4, 16, True, density=0.05, seed=seed)
    sparse = torch.zeros(n, k)
    sparse[csr_rows(tensors[ROW_PTR]), tensors[COL_IDX].long()] = tensors[VALUES].float()
    return tensors, sparse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_csr_outliers_matches_dense(dtype: torch.dtype) -> None:
    tensors, sparse = _outliers()
    x = torch.randn(2, 5, 80).to(dtype)  # leading dimensions pass through
    y = torch.randn(2, 5, 48).to(dtype)
    got = add_csr_outliers(y, x, tensors[ROW_PTR], tensors[COL_IDX], tensors[VALUES])
    want = (y.float() + x.float() @ sparse.t()).to(dtype)
    assert got.dtype == dtype and got.shape == y.shape
    # one rounding of the float32 sum to dtype; float32 sums in another order
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 0.0,
                               atol=1e-5 if dtype == torch.float32 else 0.0)


def test_add_csr_outliers_compiles_fullgraph_without_specialising_on_m() -> None:
    tensors, _ = _outliers()
    args = (tensors[ROW_PTR], tensors[COL_IDX], tensors[VALUES])

    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return add_csr_outliers(y, x, *args)

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="inductor", dynamic=True)
    compiled(torch.randn(3, 80), torch.randn(3, 48))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in (17, 130):
            x, y = torch.randn(m, 80), torch.randn(m, 48)
            torch.testing.assert_close(compiled(x, y), forward(x, y))
    x, y = torch.randn(1, 80), torch.randn(1, 48)  # Dynamo specialises size 1: a new graph
    torch.testing.assert_close(compiled(x, y), forward(x, y))
