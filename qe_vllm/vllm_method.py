"""The ``quantease`` quantization method for vLLM.

Shaped like vLLM's own ``model_executor/layers/quantization/*.py``: a config
class that parses ``quantization_config`` and hands out a linear method, and a
linear method that declares the checkpoint tensors with vLLM's parameter types
(so merged QKV / gate-up layers and tensor parallelism load with vLLM's own
loaders), assembles the variable-length outliers after loading, and computes
``y = x (deq(Q) + S)^T``.

Dense tensors follow ``qe_vllm.format`` (``[out, ...]`` orientation, codes
packed along the input dimension). Outliers arrive as one CSR triple per
checkpoint module; each is stashed by a zero-size "sink" parameter and cut to
this rank in ``process_weights_after_loading`` (see ``qe_vllm.outlier_shards``).
"""

from __future__ import annotations

import os
from fractions import Fraction
from functools import partial
from typing import Any, Hashable

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)
from vllm.model_executor.utils import set_weight_attrs

from qe_vllm.format import (
    OUTLIER_TENSORS,
    OUTLIER_VALUE_DTYPES,
    QUANT_METHOD,
    SCALE_DTYPE,
    ZERO_DTYPE,
    CheckpointFormatError,
    QuantEaseConfig,
    num_groups,
    packed_width,
    validate_grid_values,
)
from qe_vllm.kernels.int4_layout import int4pack_linear, to_int4pack
from qe_vllm.kernels.torch_linear import (
    add_csr_outliers,
    flat_outlier_index,
    quantease_linear_torch,
)
from qe_vllm.outlier_shards import RowSlice, assemble_outliers

# Under the "vllm" logger tree so messages use vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = init_logger("vllm.quantease")

# "auto": Triton kernels on CUDA with Triton available; elsewhere torch's CPU int4 GEMM for
# layers of at most 4 bits (plus sparse outliers) and the exact torch path for the rest.
# "torch" / "triton" force one path: "torch" is the exact dequantize-per-call path for
# every layer (bit-compatible with a dense checkpoint of the same weights, slow); forcing
# "triton" off-GPU runs the custom op's torch fallback, which exercises the kernel
# layout and op plumbing on CPU.
KERNEL_ENV = "QE_VLLM_KERNEL"
KERNEL_CHOICES = ("auto", "torch", "triton")


def _kernel_choice() -> str:
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={choice!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    return choice


def _use_kernel_op(device: torch.device) -> bool:
    choice = _kernel_choice()
    if choice != "auto":
        return choice == "triton"
    from vllm.triton_utils import HAS_TRITON

    return device.type == "cuda" and HAS_TRITON


# Every tensor a layer keeps after loading, whichever runtime path it took (resident-memory
# accounting): the exact torch path, or the int4 kernel's repacked tensors plus CSR outliers.
RUNTIME_TENSORS = (
    "qweight", "scales", "qzeros", "outlier_index",
    "int4_weight", "int4_scales_and_zeros",
    "outlier_row_ptr", "outlier_col_idx", "outlier_val",
)


@register_quantization_config(QUANT_METHOD)
class QuantEaseVllmConfig(QuantizationConfig):
    """Config class for QuantEase checkpoints (low-bit codes + sparse outliers)."""

    def __init__(self, fmt: QuantEaseConfig) -> None:
        super().__init__()
        self.fmt = fmt
        # Load-time bookkeeping for the one-line resident-memory report.
        self.layers_created = 0
        self.layers_loaded = 0
        self.resident_bytes = 0
        self.dense_bytes = 0
        self.nnz = 0

    def __repr__(self) -> str:
        f = self.fmt
        return (
            f"QuantEaseVllmConfig(bits={f.bits}, group_size={f.group_size}, sym={f.sym}, "
            f"outlier_fraction={f.outlier_fraction}, outlier_structure={f.outlier_structure})"
        )

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Non-empty on purpose: `--quantization quantease` on a checkpoint without
        # a quantease `quantization_config` must fail instead of loading garbage.
        return ["quantease_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantEaseVllmConfig":
        return cls(QuantEaseConfig.from_dict(config))

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Validate a local checkpoint while vLLM builds its config, before any weight is loaded.

        vLLM calls this hook once, in the process that parses the arguments, so a
        corrupt or mismatched checkpoint stops ``vllm serve`` at start-up with one
        message naming the layer, instead of failing inside a weight loader or a
        kernel (or serving garbage). A hub id is not on disk yet at this point; its
        tensors are still checked as they load (``process_weights_after_loading``).
        """
        from pathlib import Path

        from qe_vllm.converters.checkpoint import validate_checkpoint

        if not Path(model_name).is_dir():
            logger.info("QuantEase: %s is not a local directory; checking tensors as they load", model_name)
            return
        validate_checkpoint(Path(model_name))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> LinearMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        skipped = is_layer_skipped(
            prefix,
            self.fmt.modules_to_not_convert,
            self.packed_modules_mapping,
            match_mode="suffix",
        )
        return UnquantizedLinearMethod() if skipped else QuantEaseLinearMethod(self)


@register_weight_loader_v2_supported_method
class QuantEaseLinearMethod(LinearMethodBase):
    """Linear method for QuantEase: packed codes, scales, zeros and CSR outliers."""

    def __init__(self, quant_config: QuantEaseVllmConfig) -> None:
        self.quant_config = quant_config
        self.fmt = quant_config.fmt

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        fmt = self.fmt
        in_pp, out_pp = input_size_per_partition, sum(output_partition_sizes)
        if in_pp != input_size:  # row-parallel rank
            self._check_row_split(layer, in_pp, input_size)
        weight_loader = extra_weight_attrs["weight_loader"]

        qweight = PackedvLLMParameter(
            data=torch.empty(out_pp, packed_width(fmt.bits, in_pp), dtype=torch.int32),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=Fraction(32, fmt.bits),
            weight_loader=weight_loader,
        )
        layer.register_parameter("qweight", qweight)

        grid_shape = (out_pp, num_groups(fmt.group_size, in_pp))
        for name, dtype in (("scales", SCALE_DTYPE), ("qzeros", ZERO_DTYPE)):
            if name == "qzeros" and fmt.sym:
                continue
            data = torch.empty(grid_shape, dtype=dtype)
            if fmt.group_size == -1:  # one group per row: replicated across row-parallel ranks
                param = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=weight_loader)
            else:
                param = GroupQuantScaleParameter(
                    data=data, output_dim=0, input_dim=1, weight_loader=weight_loader
                )
            layer.register_parameter(name, param)

        layer._qe_stash = {}
        sink_dtypes = (torch.int32, torch.int32, OUTLIER_VALUE_DTYPES[fmt.outlier_dtype])
        for name, dtype in zip(OUTLIER_TENSORS, sink_dtypes):
            sink = Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            set_weight_attrs(sink, {"weight_loader": partial(_stash_outlier_shard, layer, name)})
            layer.register_parameter(name, sink)

        layer.qe_in_features = in_pp
        layer.qe_full_in_features = input_size
        self.quant_config.layers_created += 1

    def _check_row_split(self, layer: torch.nn.Module, in_pp: int, input_size: int) -> None:
        """Row-parallel ranks must start on a word boundary and on a group boundary."""
        fmt, prefix = self.fmt, getattr(layer, "prefix", "?")
        if in_pp * fmt.bits % 32:
            raise ValueError(
                f"{prefix}: input size {input_size} split over tensor-parallel ranks gives "
                f"{in_pp} columns per rank, which does not start on a 32-bit word for "
                f"{fmt.bits}-bit codes; use a tensor-parallel size that keeps "
                f"(in_features / tp * {fmt.bits}) a multiple of 32"
            )
        if fmt.group_size != -1 and in_pp % fmt.group_size:
            raise ValueError(
                f"{prefix}: input size {input_size} split over tensor-parallel ranks gives "
                f"{in_pp} columns per rank, not a multiple of group_size={fmt.group_size}; "
                "convert with a smaller group size or use a smaller tensor-parallel size"
            )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        fmt, prefix = self.fmt, getattr(layer, "prefix", "?")
        plan, col_start = _row_plan(layer)
        if set(layer._qe_stash) == {None} and len(plan) > 1:
            plan = _fused_row_plan(layer, plan)
        in_pp, in_full = layer.qe_in_features, layer.qe_full_in_features
        try:
            validate_grid_values(prefix, {n: getattr(layer, n, None) for n in ("scales", "qzeros")}, fmt)
            rows, cols, vals = assemble_outliers(
                prefix, layer._qe_stash, plan, in_full, col_start, in_pp,
                value_dtype=OUTLIER_VALUE_DTYPES[fmt.outlier_dtype],
            )
        except ValueError as e:
            raise CheckpointFormatError(f"QuantEase checkpoint is invalid: {e}") from None
        del layer._qe_stash
        for name in OUTLIER_TENSORS:
            delattr(layer, name)

        device = layer.qweight.device
        canonical = {n: getattr(layer, n).data for n in ("qweight", "scales", "qzeros") if hasattr(layer, n)}
        for name in canonical:
            delattr(layer, name)
        if _use_kernel_op(device):
            self._prepare_kernel(layer, canonical, (rows, cols, vals))
        else:
            self._prepare_torch(layer, canonical, rows, cols, vals)
        self._account(layer)

    def _prepare_torch(
        self,
        layer: torch.nn.Module,
        canonical: dict[str, torch.Tensor],
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
    ) -> None:
        """Runtime layout off the Triton path (CPU).

        Layers of at most 4 bits run their dense part on torch's CPU int4 GEMM and keep
        the outliers as CSR (:meth:`_prepare_int4`). Everything else (8 bits, shapes the
        int4 kernel rejects, or ``QE_VLLM_KERNEL=torch``) keeps the canonical tensors
        and dequantizes per call; outliers become flat ``row * in + col`` indices.
        """
        device = canonical["qweight"].device
        out_pp, in_pp = canonical["qweight"].shape[0], layer.qe_in_features
        if device.type == "cpu" and _kernel_choice() == "auto" and self._prepare_int4(layer, canonical):
            order = torch.argsort(rows * in_pp + cols)
            row_ptr = torch.zeros(out_pp + 1, dtype=torch.int64)
            row_ptr[1:] = torch.bincount(rows, minlength=out_pp).cumsum(0)
            csr = {  # int32 indices, as in the checkpoint
                "outlier_row_ptr": row_ptr.to(torch.int32),
                "outlier_col_idx": cols[order].to(torch.int32),
                "outlier_val": vals[order],
            }
            for name, t in csr.items():
                layer.register_parameter(name, Parameter(t.to(device), requires_grad=False))
            layer.qe_has_outliers = vals.numel() > 0
            return
        for name, t in canonical.items():
            layer.register_parameter(name, Parameter(t, requires_grad=False))
        flat = flat_outlier_index(rows, cols, out_pp, in_pp).to(device)
        layer.outlier_index = Parameter(flat, requires_grad=False)
        layer.outlier_val = Parameter(vals.to(device), requires_grad=False)

    def _prepare_int4(self, layer: torch.nn.Module, canonical: dict[str, torch.Tensor]) -> bool:
        """Derive the weights of torch's CPU int4 GEMM (``kernels/int4_layout.py``).

        Exact 4-bit codes (2/3-bit widened), scales and zero terms in the serving dtype,
        groups re-cut to a width the kernel takes. Returns False, leaving the layer
        untouched, when the layer does not fit (more than 4 bits, an output size that is
        not a multiple of 16, an input size with no accepted group width).
        """
        fmt = self.fmt
        try:
            packed = to_int4pack(
                canonical["qweight"], canonical["scales"], canonical.get("qzeros"),
                bits=fmt.bits, group_size=fmt.group_size, in_features=layer.qe_in_features,
                dtype=layer.params_dtype,
            )
        except ValueError as e:
            logger.warning_once("QuantEase: a layer falls back to the exact torch path: %s", e)
            return False
        layer.int4_weight = Parameter(packed.weight, requires_grad=False)
        layer.int4_scales_and_zeros = Parameter(packed.scales_and_zeros, requires_grad=False)
        layer.qe_int4_group = packed.group_size
        logger.info_once(
            "QuantEase: layers of at most 4 bits use torch's CPU int4 GEMM; outliers are "
            "added in float32 (CSR)"
        )
        return True

    def _prepare_kernel(
        self,
        layer: torch.nn.Module,
        canonical: dict[str, torch.Tensor],
        outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """Re-pack once into the Triton kernels' layout; the canonical tensors are dropped."""
        from qe_vllm.kernels.layout import pack_weights

        device = canonical["qweight"].device
        outliers = tuple(t.to(device) for t in outliers)
        layer.qe_kernel_weights = pack_weights(canonical, self.fmt, layer.qe_in_features, outliers=outliers)
        logger.info_once("Using QuantEase Triton kernels (torch.ops.quantease.linear)")

    def _account(self, layer: torch.nn.Module) -> None:
        cfg = self.quant_config
        kernel_weights = getattr(layer, "qe_kernel_weights", None)
        if kernel_weights is not None:
            nbytes = kernel_weights.nbytes()
            nnz = 0 if kernel_weights.outliers is None else kernel_weights.outliers.numel()
        else:
            own = (getattr(layer, n, None) for n in RUNTIME_TENSORS)
            nbytes = sum(t.numel() * t.element_size() for t in own if t is not None)
            nnz = layer.outlier_val.numel()
        cfg.resident_bytes += nbytes
        cfg.dense_bytes += sum(layer.output_partition_sizes) * layer.qe_in_features * 2
        cfg.nnz += nnz
        cfg.layers_loaded += 1
        if cfg.layers_loaded == cfg.layers_created:
            logger.info(
                "QuantEase: %d linear layers resident in %.2f MiB (%.3f of their 16-bit size "
                "%.2f MiB; %d outliers)",
                cfg.layers_loaded,
                cfg.resident_bytes / 2**20,
                cfg.resident_bytes / max(cfg.dense_bytes, 1),
                cfg.dense_bytes / 2**20,
                cfg.nnz,
            )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        kernel_weights = getattr(layer, "qe_kernel_weights", None)
        if kernel_weights is not None:
            from qe_vllm.kernels.ops import quantease_linear

            return quantease_linear(x, kernel_weights, bias)
        if hasattr(layer, "int4_weight"):
            y = int4pack_linear(
                x, layer.int4_weight, layer.int4_scales_and_zeros, layer.qe_int4_group, bias
            )
            if layer.qe_has_outliers:  # fixed at load time: a constant for Dynamo
                y = add_csr_outliers(
                    y, x, layer.outlier_row_ptr, layer.outlier_col_idx, layer.outlier_val
                )
            return y
        fmt = self.fmt
        return quantease_linear_torch(
            x,
            layer.qweight,
            layer.scales,
            getattr(layer, "qzeros", None),
            layer.outlier_index,
            layer.outlier_val,
            bits=fmt.bits,
            group_size=fmt.group_size,
            in_features=layer.qe_in_features,
            bias=bias,
        )


def _stash_outlier_shard(
    layer: torch.nn.Module,
    name: str,
    param: Parameter,
    loaded_weight: torch.Tensor,
    shard_id: Hashable = None,
) -> None:
    """Weight loader of an outlier sink: keep a copy (safetensors hands out mmap views)."""
    layer._qe_stash.setdefault(shard_id, {})[name] = loaded_weight.detach().to("cpu", copy=True)


def _row_plan(layer: torch.nn.Module) -> tuple[list[RowSlice], int]:
    """Which checkpoint rows this rank owns, where they go, and its first input column.

    Mirrors how vLLM's parameter loaders shard dense tensors, for each linear kind.
    """
    tp_rank, tp_size = layer.tp_rank, layer.tp_size
    if isinstance(layer, QKVParallelLinear):
        plan = []
        for shard in ("q", "k", "v"):
            size = layer._get_shard_size_mapping(shard)
            block = tp_rank if shard == "q" else tp_rank // layer.num_kv_head_replicas
            plan.append(RowSlice(shard, block * size, size, layer._get_shard_offset_mapping(shard)))
        return plan, 0
    if isinstance(layer, MergedColumnParallelLinear):
        plan, offset = [], 0
        for i, total in enumerate(layer.output_sizes):
            size = total // tp_size
            plan.append(RowSlice(i, tp_rank * size, size, offset))
            offset += size
        return plan, 0
    if isinstance(layer, RowParallelLinear):
        in_pp = layer.input_size_per_partition
        return [RowSlice(None, 0, layer.output_size, 0)], tp_rank * in_pp
    if len(layer.output_partition_sizes) > 1:
        raise CheckpointFormatError(
            f"{layer.prefix}: fused linear kind {type(layer).__name__} is not supported by quantease"
        )
    out_pp = layer.output_partition_sizes[0]
    sharded = out_pp != layer.output_size  # column-parallel; replicated layers keep every row
    return [RowSlice(None, tp_rank * out_pp if sharded else 0, out_pp, 0)], 0


def _fused_row_plan(layer: torch.nn.Module, plan: list[RowSlice]) -> list[RowSlice]:
    """``plan`` for a checkpoint that stores a merged linear as one tensor (Phi-3's ``qkv_proj``).

    vLLM cuts the dense tensors of such a checkpoint into its shards itself; the outliers
    arrive as one CSR triple (shard id ``None``) whose rows are the shards stacked in
    order, so each shard's rows are found below the rows of the shards before it.
    """
    if isinstance(layer, QKVParallelLinear):
        q, kv = layer.total_num_heads * layer.head_size, layer.total_num_kv_heads * layer.head_size
        base = {"q": 0, "k": q, "v": q + kv}
    else:
        starts = [0]
        for size in layer.output_sizes[:-1]:
            starts.append(starts[-1] + size)
        base = dict(enumerate(starts))
    return [RowSlice(None, base[p.shard_id] + p.src_start, p.rows, p.dst_offset) for p in plan]
