"""QuantEase linear layer in plain torch: the exact CPU path, and the sparse outlier product.

``quantease_linear_torch`` computes ``y = x · (scale · (code − zero) + S)ᵀ + bias``
by rebuilding the weight in float32 and casting it once, so the result equals a dense
checkpoint holding the same dequantized weights (the tests' oracle) up to the matmul
itself. Only plain tensor ops with static shapes: it traces under
``torch.compile(fullgraph=True)``, which vLLM applies to the whole model on CPU. It
rebuilds every weight on every call, so it is the slow, exact path: vLLM serves layers
of at most 4 bits with its own int4 kernel instead (``qe_vllm/vllm_method.py``) and
adds the outliers with :func:`add_csr_outliers`.
"""

from __future__ import annotations

import torch

from qe_vllm.format import dequantize, sym_zero, unpack_codes


def flat_outlier_index(
    rows: torch.Tensor, cols: torch.Tensor, out_features: int, in_features: int
) -> torch.Tensor:
    """Outlier positions as flat indices ``row * in + col`` (int32 when they fit)."""
    dtype = torch.int32 if out_features * in_features < 2**31 else torch.int64
    return (rows.long() * in_features + cols.long()).to(dtype)


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
    # in place: w is a fresh temporary, and an out-of-place add would copy all of it
    return w.view(-1).index_add_(0, outlier_index, outlier_val.float()).view_as(w)


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


def add_csr_outliers(
    y: torch.Tensor,
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """``y + x @ S.T`` for outliers ``S [N, K]`` given as CSR over output rows.

    Written as one ``embedding_bag``: output row ``r`` is the bag of input columns holding
    row ``r``'s outliers, weighted by their values, looked up in ``x`` transposed
    (``[K, M]``: one "embedding" per input column, all tokens at once). That is a fused
    gather-multiply-segment-sum that takes the checkpoint's int32 CSR as is, and a plain
    aten op, so it runs in eager mode and under ``torch.compile(fullgraph=True)`` alike
    (``torch.sparse`` tensors cannot be traced). Measured on SmolLM2 shapes it is as fast
    as MKL's sparse product (``benchmarks/cpu_linear.py``). Sums are float32; each output
    is rounded to ``y.dtype`` once more after adding to ``y``.
    """
    x2 = x.reshape(-1, x.shape[-1])
    sparse_t = torch.nn.functional.embedding_bag(
        col_idx, x2.t().float().contiguous(), row_ptr, mode="sum",
        per_sample_weights=values.float(), include_last_offset=True,
    )  # [N, M]
    y2 = y.reshape(-1, y.shape[-1]).float() + sparse_t.t()
    return y2.to(y.dtype).reshape(y.shape)
