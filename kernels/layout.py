"""Kernel-side layout of a QuantEase linear, derived from the canonical checkpoint tensors.

The checkpoint (``qe_vllm.format``) stores codes as one bit stream per *output* row, which
is the natural order for the converter but the wrong one for a GEMV/GEMM over ``x [M, K]``:
a kernel tile wants many output columns per load and one shift pattern per K row. So at
load time, once, we repack (pure torch; described in ``docs/FORMAT.md``, "Kernel-side layout"):

* codes packed **along K** into int32 words, stored ``[K_pad / e, N]`` with **N contiguous**
  (``e = 32 / bits`` codes per word, code ``k`` of a word at bits ``(k % e) * bits``) so a
  tile row of N columns is one coalesced load and every column shares the shift vector;
* 3 bits as two **bit planes** — the low 2 bits ``[K_pad/16, N]`` and bit 2 ``[K_pad/32, N]``
  — exactly 3.0 bits/weight with power-of-two shifts and no word straddles;
* ``scales`` ``[G, N]`` fp16 and, when asymmetric, ``zero_term = -zero * scale`` ``[G, N]``
  fp16 so dequantization is one FMA, ``w = code * scale + zero_term``; symmetric layers
  keep the implicit zero ``2**(bits-1)`` and store no zero tensor;
* outliers **bucketed by (N-tile, K-chunk)**: a CSR over buckets (``bucket_ptr``) whose
  entries are 32-bit words ``k_local | n_local << 8 | value_bits << 16`` with tile-local
  indices, each bucket padded with zero words to a multiple of ``OUTLIER_BLOCK``. Tile-local
  indices let any program that owns a (K-range, N-tile) find exactly its outliers, whatever
  its M or split-K, and add them into its own accumulators in the same launch.

Everything here is derived and reversible (:func:`to_canonical`), so the kernel layout can
change without touching checkpoints. :func:`dequantize_weights` is the torch reference for
the kernel layout: it computes exactly what the Triton kernels compute, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qe_vllm.format import (
    COL_IDX,
    QWEIGHT,
    QZEROS,
    ROW_PTR,
    SCALES,
    VALUES,
    QuantEaseConfig,
    csr_rows,
    group_width,
    pack_codes,
    sym_zero,
    unpack_codes,
)

K_ALIGN = 32
"""K is zero-padded to a multiple of this, so every bit plane holds whole int32 words."""
OUTLIER_BLOCK = 16
"""Outlier entries a kernel processes per step; every bucket is padded to a multiple."""
DEFAULT_TILE_N = 64
"""Output columns per outlier bucket; a kernel's BLOCK_N must be a multiple of it."""
DEFAULT_TILE_K = 128
"""Input rows per outlier bucket; split-K ranges are multiples of it."""
MAX_TILE = 256
"""Tile-local indices are stored in 8 bits."""
OUTLIER_VALUE_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class QuantEaseWeights:
    """One quantized linear in kernel layout (tensors on the compute device).

    Computes ``y = x @ W.T`` for ``W [N, K]``; shapes below use ``K = in_features``,
    ``N = out_features``, ``K_pad = ceil(K / 32) * 32``, ``G`` groups per output row.
    ``bucket_ptr``/``outliers`` are ``None`` for a layer without outliers so kernels compile
    the outlier epilogue out.
    """

    qweight: torch.Tensor
    """int32 ``[K_pad / e, N]``; for 3 bits the low 2-bit plane ``[K_pad / 16, N]``."""
    qweight_hi: torch.Tensor | None
    """3 bits only: bit 2 of every code, int32 ``[K_pad / 32, N]``."""
    scales: torch.Tensor
    """fp16 ``[G, N]``."""
    zero_term: torch.Tensor | None
    """fp16 ``[G, N]`` holding ``-zero * scale``; ``None`` when symmetric."""
    bucket_ptr: torch.Tensor | None
    """int32 ``[n_tiles * n_chunks + 1]``: entries of bucket ``tile * n_chunks + chunk``."""
    outliers: torch.Tensor | None
    """int32 entries ``k_local | n_local << 8 | value_bits << 16``."""
    bits: int
    group_size: int
    """As in the checkpoint: ``-1`` (one group per output row) or the group width."""
    in_features: int
    tile_n: int
    tile_k: int
    outliers_bf16: bool
    """Outlier value bits are bfloat16 (else float16)."""

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def group_width(self) -> int:
        return group_width(self.group_size, self.in_features)

    @property
    def n_tiles(self) -> int:
        return -(-self.out_features // self.tile_n)

    @property
    def n_chunks(self) -> int:
        return -(-self.in_features // self.tile_k)

    @property
    def has_outliers(self) -> bool:
        return self.bucket_ptr is not None

    def kernel_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The kernels' pointer arguments, in their order."""
        return (
            self.qweight, self.qweight_hi, self.scales, self.zero_term, self.bucket_ptr,
            self.outliers,
        )  # fmt: skip

    def op_args(self) -> tuple[torch.Tensor | int | bool | None, ...]:
        """All fields in declaration order: ``torch.ops.quantease.linear``'s arguments after x."""
        return (
            *self.kernel_tensors(), self.bits, self.group_size, self.in_features, self.tile_n,
            self.tile_k, self.outliers_bf16,
        )  # fmt: skip

    def nbytes(self) -> int:
        """Resident bytes of all tensors (what a GEMV streams from memory, besides x and y)."""
        return sum(t.numel() * t.element_size() for t in self.kernel_tensors() if t is not None)


# --------------------------------------------------------------------------- bit packing along K


def _plane_bits(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes a code is split into, low bits first."""
    return (2, 1) if bits == 3 else (bits,)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_along_k(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[K_pad, N]`` codes to int32 ``[K_pad / e, N]``; code k at bits ``(k % e) * bits``."""
    per_word = 32 // bits
    words = torch.zeros(
        codes_kn.shape[0] // per_word, codes_kn.shape[1], dtype=torch.int64, device=codes_kn.device
    )
    for j in range(per_word):
        words |= codes_kn[j::per_word].to(torch.int64) << (j * bits)
    return _to_int32(words)


def _unpack_along_k(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_along_k`: int32 ``[K_pad / e, N]`` to int32 codes ``[K_pad, N]``."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    codes = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
    return codes.flatten(0, 1)


def unpack_kernel_codes(w: QuantEaseWeights) -> torch.Tensor:
    """Codes ``[K, N]`` (int32) of a kernel-layout layer."""
    planes = (w.qweight,) if w.qweight_hi is None else (w.qweight, w.qweight_hi)
    codes: torch.Tensor | int = 0
    shift = 0
    for plane, nbits in zip(planes, _plane_bits(w.bits)):
        codes = codes | (_unpack_along_k(plane, nbits) << shift)
        shift += nbits
    assert isinstance(codes, torch.Tensor)
    return codes[: w.in_features]


# --------------------------------------------------------------------------- outlier entries


def encode_entries(
    k_local: torch.Tensor, n_local: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Pack tile-local indices and fp16/bf16 values into int32 ``k | n << 8 | bits(v) << 16``."""
    value_bits = values.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return _to_int32(k_local.to(torch.int64) | (n_local.to(torch.int64) << 8) | (value_bits << 16))


def decode_entries(
    entries: torch.Tensor, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_entries`: ``(k_local, n_local, float32 values)``."""
    e = entries.to(torch.int64) & 0xFFFFFFFF
    value_bits = ((e >> 16) & 0xFFFF).to(torch.int32)
    value_bits = torch.where(value_bits >= 2**15, value_bits - 2**16, value_bits).to(torch.int16)
    values = value_bits.view(torch.bfloat16 if bf16 else torch.float16).float()
    return e & 0xFF, (e >> 8) & 0xFF, values


def _bucket_outliers(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    n_tiles: int,
    n_chunks: int,
    tile_n: int,
    tile_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bucket_ptr, entries)`` for outliers at ``(rows, cols)``, dropping zero values."""
    keep = values != 0
    rows, cols, values = rows[keep], cols[keep], values[keep]
    bucket = (rows // tile_n) * n_chunks + cols // tile_k
    order = torch.argsort(bucket, stable=True)
    bucket, rows, cols, values = bucket[order], rows[order], cols[order], values[order]
    n_buckets = n_tiles * n_chunks
    counts = torch.bincount(bucket, minlength=n_buckets)
    padded = (counts + OUTLIER_BLOCK - 1) // OUTLIER_BLOCK * OUTLIER_BLOCK
    bucket_ptr = torch.zeros(n_buckets + 1, dtype=torch.int64, device=rows.device)
    bucket_ptr[1:] = padded.cumsum(0)
    first_sorted = counts.cumsum(0) - counts  # where each bucket starts among the sorted entries
    slot = (
        bucket_ptr[bucket] + torch.arange(bucket.numel(), device=rows.device) - first_sorted[bucket]
    )
    entries = torch.zeros(int(bucket_ptr[-1]), dtype=torch.int32, device=rows.device)
    entries[slot] = encode_entries(cols % tile_k, rows % tile_n, values)
    return bucket_ptr.to(torch.int32), entries


def outlier_coordinates(w: QuantEaseWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ``(row n, column k, float32 value)`` of every stored outlier, padding removed."""
    assert w.bucket_ptr is not None and w.outliers is not None
    slot = torch.arange(w.outliers.numel(), device=w.outliers.device)
    bucket = torch.searchsorted(w.bucket_ptr.to(torch.int64), slot, right=True) - 1
    k_local, n_local, values = decode_entries(w.outliers, w.outliers_bf16)
    rows = (bucket // w.n_chunks) * w.tile_n + n_local
    cols = (bucket % w.n_chunks) * w.tile_k + k_local
    keep = values != 0
    return rows[keep], cols[keep], values[keep]


# --------------------------------------------------------------- canonical <-> kernel layout


def pack_weights(
    tensors: dict[str, torch.Tensor],
    cfg: QuantEaseConfig,
    in_features: int,
    *,
    outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    tile_n: int = DEFAULT_TILE_N,
    tile_k: int = DEFAULT_TILE_K,
) -> QuantEaseWeights:
    """Derive the kernel layout from one layer's canonical tensors (``qe_vllm.format`` names).

    Runs once at load time on the tensors' device. Outliers come from ``outliers =
    (rows, cols, values)`` — COO in any order, as a loader holds them after
    tensor-parallel slicing — or else from the CSR tensors in ``tensors``; neither means
    none. ``tile_n``/``tile_k`` fix the outlier buckets: kernels then need
    ``BLOCK_N % tile_n == 0`` and split-K ranges that are multiples of ``tile_k``.
    """
    for name, tile in (("tile_n", tile_n), ("tile_k", tile_k)):
        if not (OUTLIER_BLOCK <= tile <= MAX_TILE and tile & (tile - 1) == 0):
            raise ValueError(
                f"{name}={tile} must be a power of two in [{OUTLIER_BLOCK}, {MAX_TILE}]"
            )
    bits = cfg.bits
    codes = unpack_codes(tensors[QWEIGHT], bits, in_features).t()
    k_pad = -(-in_features // K_ALIGN) * K_ALIGN
    codes = torch.nn.functional.pad(codes, (0, 0, 0, k_pad - in_features))
    planes = []
    shift = 0
    for nbits in _plane_bits(bits):
        planes.append(_pack_along_k((codes >> shift) & (2**nbits - 1), nbits))
        shift += nbits
    scales = tensors[SCALES]
    zero_term = None
    if not cfg.sym:
        zero_term = (-(tensors[QZEROS].float() * scales.float())).to(torch.float16).t().contiguous()
    w = QuantEaseWeights(
        qweight=planes[0].contiguous(),
        qweight_hi=planes[1].contiguous() if len(planes) > 1 else None,
        scales=scales.to(torch.float16).t().contiguous(),
        zero_term=zero_term,
        bucket_ptr=None,
        outliers=None,
        bits=bits,
        group_size=cfg.group_size,
        in_features=in_features,
        tile_n=tile_n,
        tile_k=tile_k,
        outliers_bf16=False,
    )
    if outliers is None and ROW_PTR in tensors:
        outliers = (csr_rows(tensors[ROW_PTR]), tensors[COL_IDX], tensors[VALUES])
    if outliers is not None and outliers[2].numel() > 0:
        rows, cols, values = outliers
        if values.dtype not in OUTLIER_VALUE_DTYPES:
            raise ValueError(
                f"outlier values have dtype {values.dtype}; expected one of {OUTLIER_VALUE_DTYPES}"
            )
        w.bucket_ptr, w.outliers = _bucket_outliers(
            rows.to(torch.int64),
            cols.to(torch.int64),
            values,
            w.n_tiles,
            w.n_chunks,
            tile_n,
            tile_k,
        )
        w.outliers_bf16 = values.dtype == torch.bfloat16
    return w


def to_canonical(w: QuantEaseWeights) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_weights`: canonical tensors (CSR outliers, zero values dropped)."""
    out = {
        QWEIGHT: pack_codes(unpack_kernel_codes(w).t(), w.bits),
        SCALES: w.scales.t().contiguous(),
    }
    if w.zero_term is not None:
        # fp16(-z*s) is within 2**-11 relative of -z*s and z <= 255: rounding recovers z.
        zeros = torch.round(-w.zero_term.float() / w.scales.float()).clamp(0, 2**w.bits - 1)
        out[QZEROS] = zeros.to(torch.uint8).t().contiguous()
    if w.has_outliers:
        rows, cols, values = outlier_coordinates(w)
        order = torch.argsort(rows * w.in_features + cols)
        rows, cols, values = rows[order], cols[order], values[order]
        row_ptr = torch.zeros(w.out_features + 1, dtype=torch.int64, device=rows.device)
        row_ptr[1:] = torch.bincount(rows, minlength=w.out_features).cumsum(0)
        out[ROW_PTR] = row_ptr.to(torch.int32)
        out[COL_IDX] = cols.to(torch.int32)
        out[VALUES] = values.to(torch.bfloat16 if w.outliers_bf16 else torch.float16)
    return out


def dequantize_weights(w: QuantEaseWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W.T`` ``[K, N]`` from the kernel layout, computed as the kernels do, cast to ``dtype``.

    The torch reference beside the Triton kernels, and the CPU fallback of the op.
    Differs from the canonical meaning only by the fp16 rounding of ``zero_term``.
    """
    codes = unpack_kernel_codes(w).float()
    k = w.in_features
    scales = w.scales.float().repeat_interleave(w.group_width, dim=0)[:k]
    if w.zero_term is None:
        dense = (codes - sym_zero(w.bits)) * scales
    else:
        dense = codes * scales + w.zero_term.float().repeat_interleave(w.group_width, dim=0)[:k]
    if w.has_outliers:
        rows, cols, values = outlier_coordinates(w)
        dense.index_put_((cols, rows), values, accumulate=True)
    return dense.to(dtype)
