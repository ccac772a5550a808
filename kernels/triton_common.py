"""Triton device functions shared by the fused matmul and the dequantize kernels.

Each device helper works elementwise on *broadcastable* index tensors, so one definition serves a
dense tile (``k [BK, 1]``, ``n [1, BN]``) and a gather of scattered outlier positions
(``k [T]``, ``n [T]``). The layout they read is the one built by ``layout.pack_weights``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .layout import OUTLIER_BLOCK, QuantEaseWeights


@triton.jit
def load_codes(qw_ptr, qhi_ptr, k, n, mask, N, BITS: tl.constexpr):
    """int32 codes at rows ``k``, columns ``n`` of the K-packed planes (masked lanes give 0).

    Words are ``[K_pad / e, N]`` with N contiguous, so the ``e`` rows sharing a word hit
    the same cache line; 3-bit codes come from a 2-bit and a 1-bit plane, never straddling.
    """
    if BITS == 3:
        lo = tl.load(qw_ptr + (k // 16) * N + n, mask=mask, other=0)
        hi = tl.load(qhi_ptr + (k // 32) * N + n, mask=mask, other=0)
        codes = ((lo >> ((k % 16) * 2)) & 3) | (((hi >> (k % 32)) & 1) << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        word = tl.load(qw_ptr + (k // PER_WORD) * N + n, mask=mask, other=0)
        codes = (word >> ((k % PER_WORD) * BITS)) & ((1 << BITS) - 1)
    return codes


@triton.jit
def dequantize_codes(codes, s_ptr, z_ptr, g, n, mask, N, BITS: tl.constexpr):
    """float32 weights for ``codes`` in group rows ``g`` (a scalar when the block is one group).

    Asymmetric layers store ``zero_term = -zero * scale`` so this is one FMA; symmetric ones
    (``z_ptr is None``) use the implicit zero ``2**(BITS-1)``. Masked lanes give exactly 0.
    """
    s = tl.load(s_ptr + g * N + n, mask=mask, other=0.0).to(tl.float32)
    if z_ptr is not None:
        z = tl.load(z_ptr + g * N + n, mask=mask, other=0.0).to(tl.float32)
        w = codes.to(tl.float32) * s + z
    else:
        w = (codes - (1 << (BITS - 1))).to(tl.float32) * s
    return w


@triton.jit
def decode_outliers(entries, VAL_BF16: tl.constexpr):
    """Split int32 entries ``k | n << 8 | value_bits << 16`` into (k_local, n_local, fp32 value)."""
    k_local = entries & 255
    n_local = (entries >> 8) & 255
    if VAL_BF16:
        # bf16 bits are the top half of the fp32 with the same value
        value = (entries & -65536).to(tl.float32, bitcast=True)
    else:
        value = ((entries >> 16) & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return k_local, n_local, value


def one_group_per_block(w: QuantEaseWeights, block_k: int) -> bool:
    """Every aligned ``block_k`` rows share one scale row (so it is loaded once per block)."""
    return w.scales.shape[0] == 1 or w.group_width % block_k == 0


def layout_constexprs(w: QuantEaseWeights, block_k: int) -> dict[str, int | bool]:
    """Compile-time kernel parameters that come from the layer's layout."""
    return {
        "BITS": w.bits,
        "SCALE_ROW": one_group_per_block(w, block_k),
        "VAL_BF16": w.outliers_bf16,
        "TILE_N": w.tile_n,
        "TILE_K": w.tile_k,
        "OUTLIER_BLOCK": OUTLIER_BLOCK,
    }
