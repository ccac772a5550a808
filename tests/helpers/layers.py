"""Random QuantEase layers and error bounds, shared by the kernel tests and benchmarks.

Layers are built through ``qe_vllm.format`` (``pack_codes``, ``csr_from_dense``) so they
are exactly what a checkpoint would hold. Nothing is zero by accident: codes cover the
whole grid, scales are positive, outlier values are bounded away from 0.

Test code, not shipped (it was ``qe_vllm.kernels.testing``). It imports only torch and
``qe_vllm.format``: ``benchmarks/kernels.py`` and ``benchmarks/cpu_linear.py`` load this
file by its path, and the GPU machine has torch, triton and transformers only.
"""

from __future__ import annotations

import torch

from qe_vllm.format import (
    COL_IDX,
    QWEIGHT,
    QZEROS,
    ROW_PTR,
    SCALES,
    VALUES,
    QuantEaseConfig,
    csr_from_dense,
    csr_rows,
    expand_groups,
    num_groups,
    pack_codes,
    sym_zero,
    unpack_codes,
)

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def random_layer(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int,
    sym: bool,
    density: float,
    *,
    seed: int = 0,
    hot_block: tuple[int, int] | None = (12, 16),
    empty_row_every: int | None = 5,
    outlier_dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], QuantEaseConfig]:
    """Canonical tensors of a random layer and its config, generated on ``device``.

    With ``density > 0`` the outliers are Bernoulli(``density``) positions, plus a dense
    ``hot_block`` at the top-left (one outlier bucket holding many entries), minus every
    ``empty_row_every``-th output row (rows without outliers); pass ``None`` to skip either.
    """
    g = torch.Generator(device).manual_seed(seed)
    n_groups = num_groups(group_size, in_features)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device)

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=g, device=device)

    tensors = {
        QWEIGHT: pack_codes(randint(2**bits, out_features, in_features), bits),
        SCALES: (0.004 + 0.012 * rand(out_features, n_groups)).to(torch.float16),
    }
    if not sym:
        tensors[QZEROS] = randint(2**bits, out_features, n_groups).to(torch.uint8)
    if density > 0:
        mask = rand(out_features, in_features) < density
        if hot_block is not None:
            mask[: hot_block[0], : hot_block[1]] = True
        if empty_row_every is not None:
            mask[::empty_row_every] = False
        magnitude = 0.05 + 0.45 * rand(out_features, in_features)
        sign = torch.where(rand(out_features, in_features) < 0.5, -1.0, 1.0)
        tensors.update(csr_from_dense(torch.where(mask, sign * magnitude, 0.0), outlier_dtype))
    dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[outlier_dtype]
    # csr_from_dense builds row_ptr on the CPU whatever the input device
    return {name: t.to(device) for name, t in tensors.items()}, QuantEaseConfig(
        bits=bits, group_size=group_size, sym=sym, outlier_dtype=dtype_name
    )


def magnitude_weight(
    tensors: dict[str, torch.Tensor], cfg: QuantEaseConfig, in_features: int
) -> torch.Tensor:
    """``scale * (code + zero) + |S|`` ``[N, K]``: bounds ``|W|`` and ``zero * scale``."""
    codes = unpack_codes(tensors[QWEIGHT], cfg.bits, in_features).float()
    scales = expand_groups(tensors[SCALES].float(), cfg.group_size, in_features)
    if cfg.sym:
        zeros: torch.Tensor | float = float(sym_zero(cfg.bits))
    else:
        zeros = expand_groups(tensors[QZEROS].float(), cfg.group_size, in_features)
    sparse = torch.zeros_like(codes)
    if ROW_PTR in tensors:
        index = (csr_rows(tensors[ROW_PTR]), tensors[COL_IDX].long())
        sparse.index_put_(index, tensors[VALUES].float().abs(), accumulate=True)
    return scales * (codes + zeros) + sparse


def error_bound(
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    cfg: QuantEaseConfig,
    in_features: int,
    y_ref: torch.Tensor,
) -> torch.Tensor:
    """Per-element bound on ``|y - y_ref|`` for a product with ``x.dtype`` operands, fp32 sums.

    Each term ``x_k w_k`` carries a relative error of at most ``slope = 2u + 2**-11`` (``u``
    the unit roundoff of ``x.dtype``): the weight rounded to ``x.dtype``, outliers rounded
    again, the folded zero term rounded to fp16 (relative to ``zero * scale``, which
    :func:`magnitude_weight` includes). Summed worst-case, ``slope * (|x| @ A.T)`` is too
    loose to notice a dropped small outlier; the roundings are independent and zero-mean,
    so we use the usual probabilistic bound, 6 standard deviations of a sum of uniform
    errors: ``6 / sqrt(3) * slope * sqrt(x**2 @ (A**2).T)``. Added deterministically: the
    fp32 accumulation ``K 2**-24 (|x| @ A.T)`` and the output rounding ``u |y|``.
    """
    u = UNIT_ROUNDOFF[x.dtype]
    slope = 2 * u + 2.0**-11
    a = magnitude_weight(tensors, cfg, in_features)
    xf = x.float()
    rounding = 6 / 3**0.5 * slope * ((xf * xf) @ (a * a).t()).sqrt()
    accumulation = in_features * 2.0**-24 * (xf.abs() @ a.t())
    return rounding + accumulation + u * y_ref.abs() + 1e-6
