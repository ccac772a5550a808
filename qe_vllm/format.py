"""QuantEase checkpoint format v1: the one module both the converter and the loaders use.

Specified in ``docs/FORMAT.md``. This module owns everything about the bytes on
disk and nothing about how they are produced or executed:

* ``pack_codes`` / ``unpack_codes`` — b-bit codes as a little-endian bit stream
  along the input dimension, one stream per output row, in int32 words;
* ``dequantize`` / ``dense_weight`` — the canonical meaning of a stored layer,
  ``W = scale * (code - zero) + S`` with ``S`` the sparse outliers;
* ``csr_from_dense`` — outliers as CSR over output rows;
* ``QuantEaseConfig`` — the ``quantization_config`` block of ``config.json``;
* ``validate_linear`` — shape/dtype/range checks with errors naming the layer.

It imports torch only (never vLLM or transformers), so it runs everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

QUANT_METHOD = "quantease"
FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
ZERO_DTYPE = torch.uint8
OUTLIER_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# Tensor names per quantized linear module ``P``: ``P.qweight`` etc.
QWEIGHT, SCALES, QZEROS = "qweight", "scales", "qzeros"
ROW_PTR, COL_IDX, VALUES = "outlier_row_ptr", "outlier_col_idx", "outlier_val"
OUTLIER_TENSORS = (ROW_PTR, COL_IDX, VALUES)


class CheckpointFormatError(ValueError):
    """A checkpoint does not follow the QuantEase format; the message names the layer."""


# --------------------------------------------------------------------------- grid shape


def check_bits_and_group(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
    if group_size != -1 and (group_size < 8 or group_size & (group_size - 1)):
        raise ValueError(
            f"group_size={group_size} must be -1 (one group per output channel) "
            "or a power of two >= 8"
        )


def group_width(group_size: int, in_features: int) -> int:
    """Input columns per group (``-1`` means the whole row)."""
    return in_features if group_size == -1 else group_size


def num_groups(group_size: int, in_features: int) -> int:
    """Groups per output row; the last one may be partial."""
    return -(-in_features // group_width(group_size, in_features))


def packed_width(bits: int, in_features: int) -> int:
    """int32 words per output row holding ``in_features`` codes of ``bits`` bits."""
    return -(-in_features * bits // 32)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Broadcast a per-group tensor ``[out, G]`` to per-column ``[out, in]``."""
    return t.repeat_interleave(group_width(group_size, in_features), dim=1)[:, :in_features]


# --------------------------------------------------------------------------- packing


def _bit_positions(bits: int, in_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offset = torch.arange(in_features, device=device, dtype=torch.int64) * bits
    return offset // 32, offset % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[out, in]`` into int32 words ``[out, ceil(in*bits/32)]``.

    Code ``k`` of a row occupies bits ``[k*bits, (k+1)*bits)`` of the row's bit
    stream, word ``w`` holding stream bits ``[32w, 32w+32)`` (bit 0 = least
    significant). 3-bit codes straddle word boundaries; the tail is zero.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    out_f, in_f = c.shape
    word, shift = _bit_positions(bits, in_f, c.device)
    words = torch.zeros(out_f, packed_width(bits, in_f) + 1, dtype=torch.int64, device=c.device)
    shifted = c << shift  # up to 63 bits: the part past bit 31 belongs to the next word
    words.index_add_(1, word, shifted & 0xFFFFFFFF)
    words.index_add_(1, word + 1, shifted >> 32)
    words = words[:, :-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[out, W]`` to int32 codes ``[out, in]``.

    Written with plain tensor ops (no data-dependent shapes) so it traces under
    ``torch.compile(fullgraph=True)``.
    """
    mask = 2**bits - 1
    if 32 % bits == 0:  # codes never straddle: one shift per lane
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.flatten(1)[:, :in_features]
    word, shift = _bit_positions(bits, in_features, packed.device)
    w64 = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, 1))
    pair = w64[:, word] | (w64[:, word + 1] << 32)
    return ((pair >> shift) & mask).to(torch.int32)


# --------------------------------------------------------------------------- meaning


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | int, group_size: int
) -> torch.Tensor:
    """``scale * (code - zero)`` in float32, ``[out, in]``; ``zeros`` may be a scalar (symmetric)."""
    in_f = codes.shape[1]
    s = expand_groups(scales.float(), group_size, in_f)
    z = zeros if isinstance(zeros, int) else expand_groups(zeros.to(torch.int32), group_size, in_f)
    return s * (codes - z).float()


def sym_zero(bits: int) -> int:
    """Implicit zero point of a symmetric grid."""
    return 2 ** (bits - 1)


def csr_from_dense(sparse: torch.Tensor, value_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CSR over output rows of the non-zeros of ``sparse`` ``[out, in]``."""
    rows, cols = sparse.nonzero(as_tuple=True)  # row-major order: rows sorted, cols sorted in a row
    counts = torch.bincount(rows, minlength=sparse.shape[0])
    row_ptr = torch.zeros(sparse.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = counts.cumsum(0)
    return {
        ROW_PTR: row_ptr.to(torch.int32),
        COL_IDX: cols.to(torch.int32),
        VALUES: sparse[rows, cols].to(value_dtype),
    }


def csr_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """Row index of every stored outlier (COO rows), int64."""
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts)


def dense_weight(tensors: dict[str, torch.Tensor], cfg: "QuantEaseConfig", in_features: int) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a stored layer stands for (the reference meaning)."""
    codes = unpack_codes(tensors[QWEIGHT], cfg.bits, in_features)
    zeros: torch.Tensor | int = sym_zero(cfg.bits) if cfg.sym else tensors[QZEROS]
    w = dequantize(codes, tensors[SCALES], zeros, cfg.group_size)
    if ROW_PTR in tensors:
        rows = csr_rows(tensors[ROW_PTR])
        w.index_put_((rows, tensors[COL_IDX].long()), tensors[VALUES].float(), accumulate=True)
    return w


# --------------------------------------------------------------------------- config


@dataclass
class QuantEaseConfig:
    """The ``quantization_config`` block of a QuantEase checkpoint's ``config.json``."""

    bits: int
    group_size: int = -1
    sym: bool = False
    outlier_fraction: float = 0.0
    outlier_structure: str = "unstructured"
    outlier_dtype: str = "float16"
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"])
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"outlier_fraction={self.outlier_fraction} must be in [0, 1)")
        if self.outlier_structure not in ("unstructured", "columns"):
            raise ValueError(
                f"outlier_structure={self.outlier_structure!r}; choose 'unstructured' or 'columns'"
            )
        if self.outlier_dtype not in OUTLIER_VALUE_DTYPES:
            raise ValueError(
                f"outlier_dtype={self.outlier_dtype!r}; choose one of {list(OUTLIER_VALUE_DTYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outliers"] = {
            "format": "csr",
            "fraction": d.pop("outlier_fraction"),
            "structure": d.pop("outlier_structure"),
            "value_dtype": d.pop("outlier_dtype"),
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantEaseConfig":
        """Parse and validate a ``quantization_config`` dict (unknown keys are ignored)."""
        method = str(d.get("quant_method", "")).lower()
        if method != QUANT_METHOD:
            raise CheckpointFormatError(f"quant_method is {method!r}, expected {QUANT_METHOD!r}")
        version = int(d.get("format_version", -1))
        if version < 1 or version > FORMAT_VERSION:
            raise CheckpointFormatError(
                f"format_version {version} is not supported: this qe-vllm reads versions 1..{FORMAT_VERSION}; "
                "upgrade qe-vllm to load this checkpoint"
            )
        outliers = d.get("outliers") or {}
        if outliers.get("format", "csr") != "csr":
            raise CheckpointFormatError(f"outliers.format {outliers.get('format')!r} is not supported (only 'csr')")
        try:
            return cls(
                bits=int(d["bits"]),
                group_size=int(d["group_size"]),
                sym=bool(d["sym"]),
                outlier_fraction=float(outliers.get("fraction", 0.0)),
                outlier_structure=str(outliers.get("structure", "unstructured")),
                outlier_dtype=str(outliers.get("value_dtype", "float16")),
                modules_to_not_convert=list(d.get("modules_to_not_convert") or []),
                provenance=dict(d.get("provenance") or {}),
                format_version=version,
            )
        except KeyError as e:
            raise CheckpointFormatError(f"quantization_config lacks required key {e.args[0]!r}") from None
        except ValueError as e:
            raise CheckpointFormatError(f"quantization_config is invalid: {e}") from None

    @property
    def zero_point(self) -> int | None:
        return sym_zero(self.bits) if self.sym else None

    def is_skipped(self, module_name: str) -> bool:
        """True for modules kept in the original precision (matched by name or name suffix)."""
        return any(
            module_name == m or module_name.endswith("." + m) for m in self.modules_to_not_convert
        )

    def effective_bits(self, out_features: int, in_features: int, nnz: int) -> float:
        """Stored bits per weight of one layer, counting scales, zeros and outlier storage."""
        return linear_nbytes(self, out_features, in_features, nnz) * 8 / (out_features * in_features)


# --------------------------------------------------------------------------- expected tensors


def expected_tensors(
    cfg: QuantEaseConfig, out_features: int, in_features: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...] | None]]:
    """Name -> (dtype, shape) of every tensor of one quantized linear; shape None = 1-D, any length."""
    n_groups = num_groups(cfg.group_size, in_features)
    spec: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] = {
        QWEIGHT: (torch.int32, (out_features, packed_width(cfg.bits, in_features))),
        SCALES: (SCALE_DTYPE, (out_features, n_groups)),
        ROW_PTR: (torch.int32, (out_features + 1,)),
        COL_IDX: (torch.int32, None),
        VALUES: (OUTLIER_VALUE_DTYPES[cfg.outlier_dtype], None),
    }
    if not cfg.sym:
        spec[QZEROS] = (ZERO_DTYPE, (out_features, n_groups))
    return spec


def linear_nbytes(cfg: QuantEaseConfig, out_features: int, in_features: int, nnz: int) -> int:
    """Bytes one quantized linear occupies on disk (and resident in memory)."""
    total = 0
    for name, (dtype, shape) in expected_tensors(cfg, out_features, in_features).items():
        n = nnz if shape is None else math.prod(shape)
        total += n * dtype.itemsize
    return total


def validate_linear(
    name: str,
    tensors: dict[str, torch.Tensor],
    cfg: QuantEaseConfig,
    out_features: int,
    in_features: int,
) -> None:
    """Check one layer's tensors against the format; raise naming ``name`` and the problem.

    Runs before any kernel sees the data, so a corrupt checkpoint fails at load
    time with a readable message instead of crashing inside a kernel.
    """
    for t, (dtype, shape) in expected_tensors(cfg, out_features, in_features).items():
        if t not in tensors:
            raise CheckpointFormatError(f"layer {name!r}: missing tensor {name}.{t}")
        x = tensors[t]
        if x.dtype != dtype:
            raise CheckpointFormatError(f"layer {name!r}: {t} has dtype {x.dtype}, expected {dtype}")
        if shape is not None and tuple(x.shape) != shape:
            raise CheckpointFormatError(
                f"layer {name!r}: {t} has shape {tuple(x.shape)}, expected {shape}"
            )
    validate_grid_values(name, tensors, cfg)
    validate_csr(name, tensors[ROW_PTR], tensors[COL_IDX], tensors[VALUES], in_features)


def validate_grid_values(name: str, tensors: dict[str, torch.Tensor], cfg: QuantEaseConfig) -> None:
    """Scales finite and positive, zero points within the bit range (any slice of a layer)."""
    scales = tensors[SCALES]
    if not bool(torch.isfinite(scales.float()).all()) or bool((scales <= 0).any()):
        raise CheckpointFormatError(f"layer {name!r}: {SCALES} must be finite and positive")
    if not cfg.sym and bool((tensors[QZEROS] > 2**cfg.bits - 1).any()):
        raise CheckpointFormatError(f"layer {name!r}: {QZEROS} exceed the {cfg.bits}-bit range")


def validate_csr(
    name: str, row_ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, in_features: int
) -> None:
    """Check a CSR outlier triple: consistent pointers, sorted in-range columns, finite values."""

    def fail(msg: str) -> None:
        raise CheckpointFormatError(f"layer {name!r}: {msg}")

    if row_ptr.dim() != 1 or cols.dim() != 1 or vals.dim() != 1:
        fail("outlier tensors must be 1-D")
    if row_ptr.dtype != torch.int32 or cols.dtype != torch.int32:
        fail(f"{ROW_PTR}/{COL_IDX} must be int32, got {row_ptr.dtype}/{cols.dtype}")
    nnz = cols.numel()
    if vals.numel() != nnz:
        fail(f"{COL_IDX} has {nnz} entries but {VALUES} has {vals.numel()}")
    if row_ptr.numel() == 0 or int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz:
        fail(f"{ROW_PTR} must start at 0 and end at nnz={nnz}")
    if bool((row_ptr[1:] < row_ptr[:-1]).any()):
        fail(f"{ROW_PTR} is not non-decreasing")
    if nnz == 0:
        return
    if int(cols.min()) < 0 or int(cols.max()) >= in_features:
        fail(f"{COL_IDX} out of range [0, {in_features}): min {int(cols.min())}, max {int(cols.max())}")
    rows = csr_rows(row_ptr)
    if bool(((rows[1:] == rows[:-1]) & (cols[1:] <= cols[:-1])).any()):
        fail(f"{COL_IDX} must be strictly increasing within each row (sorted, no duplicates)")
    if not bool(torch.isfinite(vals.float()).all()):
        fail(f"{VALUES} holds NaN or Inf")
