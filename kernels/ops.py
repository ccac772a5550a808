"""``torch.ops.quantease.linear``: the one entry point a serving stack calls on GPU.

A ``torch.library`` custom op (no vLLM needed) so ``torch.compile``/CUDA graphs see one
opaque node: the M-dependent kernel choice happens inside it, at run time, where vLLM's
guard-free fullgraph tracing cannot freeze it. The fake implementation only allocates
``[M, N]``. The real one launches Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``) and
otherwise falls back to the torch reference of the kernel layout (``x @ W.T``
materialised), so the op is correct on every device; the CPU serving path should call
``torch_linear.quantease_linear_torch`` instead, which Inductor can fuse.
"""

from __future__ import annotations

import torch

from .dispatch import get_config, launch, triton_usable
from .layout import QuantEaseWeights, dequantize_weights


@torch.library.custom_op("quantease::linear", mutates_args=())
def _linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qweight_hi: torch.Tensor | None,
    scales: torch.Tensor,
    zero_term: torch.Tensor | None,
    bucket_ptr: torch.Tensor | None,
    outliers: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    tile_n: int,
    tile_k: int,
    outliers_bf16: bool,
) -> torch.Tensor:
    w = QuantEaseWeights(
        qweight, qweight_hi, scales, zero_term, bucket_ptr, outliers,
        bits, group_size, in_features, tile_n, tile_k, outliers_bf16,
    )  # fmt: skip
    if x.shape[0] == 0:
        return x.new_empty(0, w.out_features)
    if triton_usable(x):
        return launch(x, w, get_config(x.shape[0], w, x.device))
    return x @ dequantize_weights(w, x.dtype)


@_linear.register_fake
def _linear_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qweight_hi: torch.Tensor | None,
    scales: torch.Tensor,
    *args: object,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales.shape[1])


def quantease_linear(
    x: torch.Tensor, w: QuantEaseWeights, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias)`` -> ``[..., N]`` via ``torch.ops.quantease.linear``."""
    y = torch.ops.quantease.linear(x.reshape(-1, x.shape[-1]), *w.op_args())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.out_features)
