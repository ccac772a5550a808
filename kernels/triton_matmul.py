"""Fused ``y = x @ (deq(Q) + S).T``: dequantization in registers, outliers in the same launch.

One kernel serves the decode and medium-batch regimes; ``KernelConfig`` picks the variant:

* ``gemv`` (M up to ~16): CUDA-core FMAs, ``acc[BM, BN] += sum_k x[BM, BK, 1] * w[1, BK, BN]``.
  No tensor cores, so nothing is padded to 16 rows; split-K over many programs keeps
  enough bytes in flight to stream the weights at memory speed.
* ``gemm`` (medium M): ``tl.dot`` on the dequantized tile, optionally split-K.

Split-K programs own whole outlier K-chunks (``k_per_split`` is a multiple of
``tile_k``), so after its dense K loop each program adds the outliers of the buckets in
its (K-range, N-block) into the same accumulator — a one-hot matrix
``hot[t, n] = v_t [n_t == n]`` times the gathered activations ``x[:, k_t]``, on tensor
cores for ``gemm`` — and partial sums meet in one fp32 ``atomic_add``. No second launch,
no pass over y, exact products (fp16 x times fp16 value in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import QuantEaseWeights
from .triton_common import decode_outliers, dequantize_codes, layout_constexprs, load_codes


@triton.jit
def _accumulate(acc, a, w, USE_DOT: tl.constexpr):
    """``acc += a @ w`` on tensor cores (``a``'s dtype) or as a CUDA-core broadcast-reduce."""
    if USE_DOT:
        acc += tl.dot(a, w.to(a.dtype))
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    return acc


# fmt: off
@triton.jit
def _add_outliers(
    acc, x_ptr, bptr_ptr, ent_ptr, offs_m, m_mask, pid_n, k_start, k_end, stride_xm,
    n_chunks, n_tiles,
    TILE_N: tl.constexpr, TILE_K: tl.constexpr, BLOCK_N: tl.constexpr,
    VAL_BF16: tl.constexpr, USE_DOT: tl.constexpr, OUTLIER_BLOCK: tl.constexpr,
):
    """``acc[m, n] += sum_k x[m, k] * S[n, k]`` over the buckets of this program's K-range, N-block.

    Buckets are ordered ``tile * n_chunks + chunk`` and padded to ``OUTLIER_BLOCK`` zero
    entries, so every step is a full, unmasked block of one bucket.
    """
    cols = tl.arange(0, BLOCK_N)
    first_chunk = k_start // TILE_K
    end_chunk = tl.cdiv(k_end, TILE_K)
    for j in tl.static_range(BLOCK_N // TILE_N):
        tile = pid_n * (BLOCK_N // TILE_N) + j
        if tile < n_tiles:
            for chunk in range(first_chunk, end_chunk):
                bucket = tile * n_chunks + chunk
                e_start = tl.load(bptr_ptr + bucket)
                e_end = tl.load(bptr_ptr + bucket + 1)
                for e in range(e_start, e_end, OUTLIER_BLOCK):
                    entries = tl.load(ent_ptr + e + tl.arange(0, OUTLIER_BLOCK))
                    k_local, n_local, value = decode_outliers(entries, VAL_BF16)
                    xs = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + (chunk * TILE_K + k_local)[None, :],
                        mask=m_mask[:, None],
                        other=0.0,
                    )
                    hot = tl.where(
                        (j * TILE_N + n_local)[:, None] == cols[None, :], value[:, None], 0.0
                    )
                    acc = _accumulate(acc, xs, hot, USE_DOT)
    return acc


@triton.jit
def _fused_matmul_kernel(
    x_ptr, qw_ptr, qhi_ptr, s_ptr, z_ptr, bptr_ptr, ent_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, group_width, k_per_split, n_chunks, n_tiles,
    BITS: tl.constexpr, SCALE_ROW: tl.constexpr, VAL_BF16: tl.constexpr,
    TILE_N: tl.constexpr, TILE_K: tl.constexpr, OUTLIER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, ATOMIC: tl.constexpr,
):
    # Programs sharing an N-block (same weights) are adjacent in launch order.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_mask = k_mask[:, None] & n_mask[None, :]
        codes = load_codes(qw_ptr, qhi_ptr, offs_k[:, None], offs_n[None, :], w_mask, N, BITS)
        if SCALE_ROW:  # the whole block lies in one group: one scale row
            w = dequantize_codes(
                codes, s_ptr, z_ptr, k0 // group_width, offs_n[None, :], n_mask[None, :], N, BITS
            )
        else:
            w = dequantize_codes(
                codes, s_ptr, z_ptr, offs_k[:, None] // group_width, offs_n[None, :], w_mask, N,
                BITS,
            )
        acc = _accumulate(acc, a, w, USE_DOT)

    if bptr_ptr is not None:
        acc = _add_outliers(
            acc, x_ptr, bptr_ptr, ent_ptr, offs_m, m_mask, pid_n, k_start, k_end, stride_xm,
            n_chunks, n_tiles, TILE_N, TILE_K, BLOCK_N, VAL_BF16, USE_DOT, OUTLIER_BLOCK,
        )

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
# fmt: on


def split_k_range(k: int, block_k: int, tile_k: int, split_k: int) -> tuple[int, int]:
    """``(k_per_split, splits)``: ranges are multiples of ``block_k`` and the outlier ``tile_k``."""
    quantum = max(block_k, tile_k)
    k_per_split = triton.cdiv(triton.cdiv(k, quantum), split_k) * quantum
    return k_per_split, triton.cdiv(k, k_per_split)


def fused_matmul(
    x: torch.Tensor,
    w: QuantEaseWeights,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int,
    use_dot: bool,
    num_warps: int,
    num_stages: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T`` into ``out [M, N]`` (x's dtype) with the fused kernel.

    With more than one K split the partial sums go to a zeroed fp32 buffer by atomics and
    are cast into ``out`` afterwards (one rounding). Allocation sizes depend on shapes
    only, so the call is CUDA-graph capturable.
    """
    m, k = x.shape
    n = w.out_features
    if k != w.in_features:
        raise ValueError(f"x has {k} features, the layer expects {w.in_features}")
    if w.has_outliers and block_n % w.tile_n:
        raise ValueError(f"block_n={block_n} must be a multiple of the outlier tile_n={w.tile_n}")
    if use_dot and min(block_m, block_k) < 16:
        raise ValueError(f"tl.dot needs block_m, block_k >= 16, got {block_m}, {block_k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    k_per_split, splits = split_k_range(k, block_k, w.tile_k, split_k)
    target = torch.zeros(m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), splits)
    _fused_matmul_kernel[grid](
        x, *w.kernel_tensors(), target,
        m, n, k, x.stride(0), target.stride(0), w.group_width, k_per_split, w.n_chunks, w.n_tiles,
        **layout_constexprs(w, block_k),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, ATOMIC=splits > 1,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        out.copy_(target)
    return out
