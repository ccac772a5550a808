"""Assemble one tensor-parallel rank's outliers from the CSR shards on disk.

vLLM allocates parameters before it reads a single tensor, but the number of
outliers is only known from the data. So the outlier tensors are stashed as
they arrive (one CSR triple per checkpoint module: ``q_proj``, ``k_proj``, ...)
and, once everything is loaded, this module cuts out the rows and columns that
belong to this rank and re-indexes them into the rank's (possibly fused) output.

Pure torch on purpose: the row plan is computed by the vLLM method from the
layer's geometry, everything here is unit-testable without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from qe_vllm.format import COL_IDX, OUTLIER_TENSORS, ROW_PTR, VALUES, csr_rows, validate_csr


@dataclass(frozen=True)
class RowSlice:
    """Rows ``[src_start, src_start + rows)`` of checkpoint shard ``shard_id`` land at ``dst_offset``."""

    shard_id: Hashable
    src_start: int
    rows: int
    dst_offset: int


def assemble_outliers(
    name: str,
    stash: dict[Hashable, dict[str, torch.Tensor]],
    plan: list[RowSlice],
    in_features: int,
    col_start: int = 0,
    col_count: int | None = None,
    value_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COO (rows, cols, vals) of this rank's outliers.

    ``in_features`` is the full (unsharded) input width the column indices refer
    to; ``[col_start, col_start + col_count)`` is this rank's input slice
    (row-parallel layers), and kept columns are re-based to it. An empty stash
    means the weights were not loaded from a checkpoint (``load_format=dummy``)
    and yields no outliers. Values keep the checkpoint's ``value_dtype``.
    """
    col_count = in_features - col_start if col_count is None else col_count
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for piece in plan:
        if not stash:
            break
        shard = stash.get(piece.shard_id)
        missing = [t for t in OUTLIER_TENSORS if shard is None or t not in shard]
        if missing:
            label = name if piece.shard_id is None else f"{name} (shard {piece.shard_id})"
            raise ValueError(f"layer {label!r}: checkpoint lacks {', '.join(missing)}")
        row_ptr, cols, vals = shard[ROW_PTR], shard[COL_IDX], shard[VALUES]
        validate_csr(name, row_ptr, cols, vals, in_features)
        if row_ptr.numel() < piece.src_start + piece.rows + 1:
            raise ValueError(
                f"layer {name!r}: {ROW_PTR} covers {row_ptr.numel() - 1} rows, "
                f"but rows up to {piece.src_start + piece.rows} are needed"
            )
        ptr = row_ptr[piece.src_start : piece.src_start + piece.rows + 1].to(torch.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        rows = csr_rows(ptr - lo) + piece.dst_offset
        c = cols[lo:hi].to(torch.int64)
        keep = (c >= col_start) & (c < col_start + col_count)
        parts.append((rows[keep], c[keep] - col_start, vals[lo:hi][keep].to(value_dtype)))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone(), torch.zeros(0, dtype=value_dtype)
    rows, cols, vals = (torch.cat(t) for t in zip(*parts))
    return rows, cols, vals
