"""QuantEase layers as 4-bit tensors for stock int4 kernels: derived, exact, never stored.

Two layouts, one per consumer:

* :func:`to_int4pack` — torch's CPU int4 GEMM (``aten._weight_int4pack_mm_for_cpu``),
  which vLLM's quantease method runs on CPU for layers of at most 4 bits
  (:func:`int4pack_linear`). Measured on SmolLM2 shapes with one thread it is 1.3-3x
  faster than vLLM's ``CPUWNA16`` kernel for 1-16 tokens and equal from 64 on
  (``benchmarks/cpu_linear.py``). Its weight is ``(code - 8) * scale + zero_term``.
* :func:`to_int4_layout` — compressed-tensors ``pack-quantized``, which stock vLLM serves;
  ``converters/export.py`` writes it. ``weight_packed`` int32 ``[N, K / 8]`` packs codes
  along the input dimension, code ``j`` of a word at bits ``4j`` (a 4-bit ``qweight`` is
  already this); ``weight_scale`` ``[N, G]`` in the serving dtype; ``weight_zero_point``
  int32 ``[N / 8, G]`` packs zero points along the output dimension (asymmetric grids);
  meaning ``scale * (code - zero)``, or ``scale * (code - 8)`` when symmetric.

Exact rewrites make every QuantEase grid of at most 4 bits fit:

* 2/3-bit codes are widened to 4 bits (values unchanged). For int4pack, codes of grids
  narrower than 4 bits, and of symmetric grids, are re-centred on 8 (``code - zero + 8``
  lies in ``[1, 15]``) so the zero term is exactly 0; 4-bit asymmetric grids keep their
  codes and carry ``zero_term = scale * (8 - zero)``;
* groups are re-cut to a width the kernel accepts that splits the stored groups and the
  input exactly (a partial last group, e.g. SmolLM2's 576 inputs with groups of 128,
  becomes groups of 64), repeating scales and zeros.

What can differ from the checkpoint's float32 meaning is only the dtype of scales and zero
terms (the serving dtype) and the kernels' own arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qe_vllm.format import expand_groups, group_width, num_groups, pack_codes, sym_zero, unpack_codes

INT4_BITS = 4
PACK_FACTOR = 32 // INT4_BITS
"""Codes (and zero points) per int32 word in the compressed-tensors layout."""
INT4PACK_GROUPS = (256, 128, 64, 32)
"""Group widths ``aten._weight_int4pack_mm_for_cpu`` accepts, widest first."""
INT4PACK_N_MULTIPLE = 16
"""``aten._convert_weight_to_int4pack_for_cpu`` needs the output size to be a multiple."""


def _regroup(t: torch.Tensor, group_size: int, new_group: int, in_features: int) -> torch.Tensor:
    """Per-group ``[N, G]`` values for groups of ``new_group`` columns (which split the old ones)."""
    old_width, new_width = group_width(group_size, in_features), group_width(new_group, in_features)
    if old_width % new_width or in_features % new_width:
        raise ValueError(
            f"groups of {new_width} columns do not split groups of {old_width} over {in_features} inputs"
        )
    if old_width == new_width:
        return t
    return t.repeat_interleave(old_width // new_width, dim=1)[:, : num_groups(new_group, in_features)]


def _check_bits(bits: int) -> None:
    if bits > INT4_BITS:
        raise ValueError(f"{bits}-bit codes do not fit a 4-bit layout")


# --------------------------------------------------------------------------- torch int4pack


@dataclass
class Int4PackWeights:
    """One linear for ``aten._weight_int4pack_mm_for_cpu`` (shapes use ``W [N, K]``)."""

    weight: torch.Tensor
    """uint8 ``[N, K / 2]``, torch's own packing."""
    scales_and_zeros: torch.Tensor
    """``[K / group_size, N, 2]`` in the activation dtype: ``(scale, zero_term)``."""
    group_size: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_and_zeros))


def int4pack_group_size(group_size: int, in_features: int) -> int | None:
    """The widest group the int4pack kernel accepts that splits the stored groups and K."""
    width = math.gcd(group_width(group_size, in_features), in_features)
    return next((g for g in INT4PACK_GROUPS if width % g == 0), None)


def to_int4pack(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> Int4PackWeights:
    """Derive the int4pack weights from canonical QuantEase tensors (``qzeros`` None = symmetric).

    ``dtype`` is the activation dtype (the kernel's scales must match it). Raises
    ``ValueError`` naming the reason when the layer does not fit: more than 4 bits, an
    output size that is not a multiple of 16, or no accepted group width.
    """
    _check_bits(bits)
    out_features = qweight.shape[0]
    if out_features % INT4PACK_N_MULTIPLE:
        raise ValueError(
            f"{out_features} output channels: the int4pack kernel needs a multiple of "
            f"{INT4PACK_N_MULTIPLE}"
        )
    new_group = int4pack_group_size(group_size, in_features)
    if new_group is None:
        raise ValueError(
            f"no group width in {INT4PACK_GROUPS} splits groups of "
            f"{group_width(group_size, in_features)} over {in_features} inputs"
        )
    codes = unpack_codes(qweight, bits, in_features)
    zeros = (
        torch.full_like(scales, sym_zero(bits), dtype=torch.int32)
        if qzeros is None else qzeros.to(torch.int32)
    )
    scales32 = scales.float()
    if bits < INT4_BITS or qzeros is None:  # code - zero + 8 fits in 4 bits: exact zero term
        codes = codes - expand_groups(zeros, group_size, in_features) + sym_zero(INT4_BITS)
        zero_term = torch.zeros_like(scales32)
    else:
        zero_term = scales32 * (sym_zero(INT4_BITS) - zeros)
    pair = torch.stack(
        [_regroup(t, group_size, new_group, in_features) for t in (scales32, zero_term)], dim=-1
    )
    return Int4PackWeights(
        weight=torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1),
        scales_and_zeros=pair.transpose(0, 1).contiguous().to(dtype),
        group_size=new_group,
    )


def int4pack_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias)`` on torch's CPU int4 GEMM; ``x`` in the scales' dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scales_and_zeros)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------- compressed-tensors


@dataclass
class Int4Layout:
    """One linear in the compressed-tensors 4-bit ``pack-quantized`` layout (``W [N, K]``)."""

    weight_packed: torch.Tensor
    """int32 ``[N, K / 8]``."""
    weight_scale: torch.Tensor
    """``[N, G]`` in the requested scale dtype."""
    weight_zero_point: torch.Tensor | None
    """int32 ``[N / 8, G]``; ``None`` for symmetric grids (implicit zero 8)."""
    group_size: int
    """Input columns per group after regrouping; ``-1`` when one group spans the row."""

    @property
    def symmetric(self) -> bool:
        return self.weight_zero_point is None


def int4_group_size(group_size: int, in_features: int) -> int:
    """The group width of the compressed-tensors layout: the stored one, or ``gcd`` with K."""
    width = group_width(group_size, in_features)
    return -1 if width == in_features else math.gcd(width, in_features)


def to_int4_layout(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    scale_dtype: torch.dtype,
    int4_group: int | None = None,
) -> Int4Layout:
    """Derive the compressed-tensors layout from canonical QuantEase tensors (``qzeros`` None = symmetric).

    ``int4_group`` forces the layout's group width (one width for every layer of an
    export); it must divide both the stored group width and ``in_features``. Default:
    :func:`int4_group_size`. Raises ``ValueError`` for grids wider than 4 bits, output
    sizes that do not pack into whole zero-point words, or an ``int4_group`` that does
    not divide.
    """
    _check_bits(bits)
    out_features = qweight.shape[0]
    if qzeros is not None and out_features % PACK_FACTOR:
        raise ValueError(
            f"{out_features} output channels do not pack into int32 zero-point words "
            f"(need a multiple of {PACK_FACTOR})"
        )
    if bits == INT4_BITS:
        packed = qweight
    else:
        codes = unpack_codes(qweight, bits, in_features)
        if qzeros is None:  # re-centre the symmetric grid on the 4-bit implicit zero
            codes = codes + (sym_zero(INT4_BITS) - sym_zero(bits))
        packed = pack_codes(codes, INT4_BITS)
    new_group = int4_group_size(group_size, in_features) if int4_group is None else int4_group
    zero_point = None
    if qzeros is not None:
        zeros = _regroup(qzeros.to(torch.int32), group_size, new_group, in_features)
        zero_point = pack_codes(zeros.t().contiguous(), INT4_BITS).t().contiguous()
    return Int4Layout(
        weight_packed=packed.contiguous(),
        weight_scale=_regroup(scales, group_size, new_group, in_features).to(scale_dtype).contiguous(),
        weight_zero_point=zero_point,
        group_size=new_group,
    )
