"""The float32 meaning of a QuantEase linear: what every kernel and the CPU path are tested against.

``y = x @ (deq(Q) + S).T`` built from ``qe_vllm.format.dense_weight`` (the canonical
tensors), so no packing or dequantization logic is restated here. Implementations:

* CPU serving path: ``kernels/torch_linear.quantease_linear_torch`` (plain torch,
  traces under ``torch.compile(fullgraph=True)``; what vLLM's ``apply`` calls on CPU);
* GPU: ``kernels/ops.quantease_linear`` over the layout of ``kernels/layout.py``, whose
  ``dequantize_weights`` is the torch reference beside the Triton kernels.
"""

from __future__ import annotations

import torch

from qe_vllm.format import QuantEaseConfig, dense_weight


def reference_linear(
    x: torch.Tensor, tensors: dict[str, torch.Tensor], cfg: QuantEaseConfig, in_features: int
) -> torch.Tensor:
    """float32 ``x @ W.T`` with ``W`` the float32 weight the canonical tensors stand for."""
    return x.float() @ dense_weight(tensors, cfg, in_features).t()
