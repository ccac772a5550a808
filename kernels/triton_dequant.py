"""Large-M path: dequantize ``W.T`` (dense + outliers) into a scratch ``[K, N]``, then cuBLAS.

Above ~1-2k tokens a GEMM is compute-bound and cuBLAS beats any fused Triton kernel, while
one extra pass over the weights costs ~(b + 16) / 8 bytes per weight, a few percent of
the GEMM. One program per outlier bucket (``tile_k x tile_n`` weights)
writes its dense tile, then — after a CTA barrier that orders those stores before the
next ones — overwrites the bucket's outlier positions with ``dense + value`` recomputed in
fp32, so every element is rounded to the output dtype once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import QuantEaseWeights
from .triton_common import decode_outliers, dequantize_codes, layout_constexprs, load_codes


# fmt: off
@triton.jit
def _dequantize_kernel(
    qw_ptr, qhi_ptr, s_ptr, z_ptr, bptr_ptr, ent_ptr, out_ptr, N, K, group_width, n_chunks,
    BITS: tl.constexpr, SCALE_ROW: tl.constexpr, VAL_BF16: tl.constexpr,
    TILE_N: tl.constexpr, TILE_K: tl.constexpr, OUTLIER_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[k, n] = W[n, k]`` for the bucket ``(chunk, tile)``: dense tile, then its outliers."""
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    offs_n = tile * TILE_N + tl.arange(0, TILE_N)
    n_mask = offs_n < N
    # Bounded by K: a block starting past K would read a scale row past the last group.
    for k0 in range(chunk * TILE_K, tl.minimum(chunk * TILE_K + TILE_K, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & n_mask[None, :]
        codes = load_codes(qw_ptr, qhi_ptr, offs_k[:, None], offs_n[None, :], mask, N, BITS)
        if SCALE_ROW:
            w = dequantize_codes(
                codes, s_ptr, z_ptr, k0 // group_width, offs_n[None, :], n_mask[None, :], N, BITS
            )
        else:
            w = dequantize_codes(
                codes, s_ptr, z_ptr, offs_k[:, None] // group_width, offs_n[None, :], mask, N, BITS
            )
        tl.store(
            out_ptr + offs_k[:, None] * N + offs_n[None, :],
            w.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    if bptr_ptr is not None:
        tl.debug_barrier()
        bucket = tile * n_chunks + chunk
        for e in range(tl.load(bptr_ptr + bucket), tl.load(bptr_ptr + bucket + 1), OUTLIER_BLOCK):
            k_local, n_local, value = decode_outliers(
                tl.load(ent_ptr + e + tl.arange(0, OUTLIER_BLOCK)), VAL_BF16
            )
            # Padding entries (value 0) alias position (0, 0) of the bucket: skip them.
            real = value != 0.0
            k = chunk * TILE_K + k_local
            n = tile * TILE_N + n_local
            codes = load_codes(qw_ptr, qhi_ptr, k, n, real, N, BITS)
            w = dequantize_codes(codes, s_ptr, z_ptr, k // group_width, n, real, N, BITS)
            tl.store(out_ptr + k * N + n, (w + value).to(out_ptr.dtype.element_ty), mask=real)
# fmt: on


def dequantize(
    w: QuantEaseWeights,
    dtype: torch.dtype,
    *,
    block_k: int = 32,
    num_warps: int = 4,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W.T`` ``[K, N]`` in ``dtype``, dense + outliers (twin of ``layout.dequantize_weights``)."""
    k, n = w.in_features, w.out_features
    if w.tile_k % block_k:
        raise ValueError(f"block_k={block_k} must divide the outlier tile_k={w.tile_k}")
    if out is None:
        out = torch.empty(k, n, dtype=dtype, device=w.qweight.device)
    _dequantize_kernel[(w.n_chunks, w.n_tiles)](
        *w.kernel_tensors(), out, n, k, w.group_width, w.n_chunks,
        **layout_constexprs(w, block_k), BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return out


def dequant_matmul(
    x: torch.Tensor,
    w: QuantEaseWeights,
    *,
    block_k: int,
    num_warps: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T`` via a dequantized scratch and ``torch.matmul`` (cuBLAS on GPU)."""
    scratch = dequantize(w, x.dtype, block_k=block_k, num_warps=num_warps)
    return torch.matmul(x, scratch, out=out)
