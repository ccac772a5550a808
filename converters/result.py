"""What every solver returns, and how it becomes checkpoint tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qe_vllm.format import (
    QWEIGHT,
    QZEROS,
    SCALES,
    SCALE_DTYPE,
    ZERO_DTYPE,
    OUTLIER_VALUE_DTYPES,
    QuantEaseConfig,
    csr_from_dense,
    dequantize,
    pack_codes,
)


@dataclass
class QuantResult:
    """One solved linear layer in the canonical (unpacked) form.

    ``codes`` int32 ``[out, in]`` in ``[0, 2**bits)``; ``scales`` float32 and
    ``zeros`` int32, both ``[out, G]``; ``outliers`` a float32 ``[out, in]``
    matrix that is zero except at the stored outliers. The weight it stands for
    is ``dequantize(codes, scales, zeros) + outliers``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    outliers: torch.Tensor | None = None

    def weight(self, group_size: int) -> torch.Tensor:
        """The effective float32 weight (dense part plus outliers)."""
        w = dequantize(self.codes, self.scales, self.zeros, group_size)
        return w if self.outliers is None else w + self.outliers

    def cpu(self) -> QuantResult:
        """The same result with its tensors on the CPU (as sent to the other processes)."""
        return QuantResult(*(None if t is None else t.cpu() for t in (self.codes, self.scales, self.zeros, self.outliers)))

    def nnz(self) -> int:
        return 0 if self.outliers is None else int(torch.count_nonzero(self.outliers))

    def to_tensors(self, cfg: QuantEaseConfig) -> dict[str, torch.Tensor]:
        """Checkpoint tensors for this layer (names without the module prefix)."""
        out = {
            QWEIGHT: pack_codes(self.codes, cfg.bits),
            SCALES: self.scales.to(SCALE_DTYPE),
        }
        if not cfg.sym:
            out[QZEROS] = self.zeros.to(ZERO_DTYPE)
        sparse = self.outliers if self.outliers is not None else torch.zeros(self.codes.shape[0], 0)
        out.update(csr_from_dense(sparse.cpu(), OUTLIER_VALUE_DTYPES[cfg.outlier_dtype]))
        return {k: v.contiguous().cpu() for k, v in out.items()}
