"""QuantEase linear layer in plain torch: the CPU path and the semantics every kernel must match.

``y = x · (scale · (code − zero) + S)ᵀ + bias``. The weight is rebuilt in
float32 and cast once, so the result equals a dense checkpoint holding the same
dequantized weights (the tests' oracle) up to the matmul itself. Only plain
tensor ops with static shapes: it traces under ``torch.compile(fullgraph=True)``,
which vLLM applies to the whole model on CPU.
"""

from __future__ import annotations

import torch

from qe_vllm.format import dequantize, sym_zero, unpack_codes


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    outlier_index: torch.Tensor,
    outlier_val: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Float32 weight ``[out, in]``; outliers given as flat indices ``row * in + col``."""
    codes = unpack_codes(qweight, bits, in_features)
    zeros = sym_zero(bits) if qzeros is None else qzeros
    w = dequantize(codes, scales, zeros, group_size)
    return w.flatten().index_add(0, outlier_index, outlier_val.float()).view_as(w)


def quantease_linear_torch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    outlier_index: torch.Tensor,
    outlier_val: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., in] -> [..., out]`` with the weight dequantized on the fly (no resident dense copy)."""
    w = dequantize_weight(
        qweight, scales, qzeros, outlier_index, outlier_val,
        bits=bits, group_size=group_size, in_features=in_features,
    )
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)
