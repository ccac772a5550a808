"""Export an outlier-free 4-bit QuantEase checkpoint to compressed-tensors for stock vLLM.

Stock vLLM (no ``quantease`` plugin) serves compressed-tensors ``pack-quantized``
checkpoints with its own mixed-precision kernels (Marlin & co. on GPU, CPUWNA16 on CPU).
A QuantEase checkpoint maps onto that format exactly when it has

* no outliers — compressed-tensors has no sparse additive term; and
* 4-bit codes — vLLM's int4 kernels are the only ones for sub-8-bit weights (compressed-
  tensors' 3-bit packing does not even load, and 2/3-bit codes would need 4-bit storage).

Anything else is refused with the reason. The codes are copied bit for bit (the
QuantEase 4-bit ``qweight`` already is ``weight_packed``); zero points are repacked along
the output dimension; scales are stored in the model's dtype (what vLLM computes with);
one group width that divides every layer's input size is used for all layers (groups
split exactly, repeating scales and zeros) because a partial last group, legal in
QuantEase, is not in compressed-tensors. Layout details: ``kernels/int4_layout.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qe_vllm.converters.checkpoint import (
    QuantizedCheckpoint,
    linear_shapes,
    model_dtype,
    read_quantized,
    staged_output,
    write_model_dir,
)
from qe_vllm.format import COL_IDX, QWEIGHT, QZEROS, SCALES
from qe_vllm.kernels.int4_layout import INT4_BITS, to_int4_layout

FORMAT = "compressed-tensors"


class ExportError(ValueError):
    """The checkpoint cannot be expressed in the target format; the message says why."""


@dataclass
class ExportReport:
    source: Path
    output: Path
    layers: int
    group_size: int
    """Group width written (``-1``: one group per output channel)."""
    symmetric: bool
    scale_dtype: torch.dtype


def check_exportable(ckpt: QuantizedCheckpoint) -> None:
    """Raise :class:`ExportError` unless stock vLLM can serve ``ckpt`` as compressed-tensors."""
    q = ckpt.qcfg
    if q.bits != INT4_BITS:
        raise ExportError(
            f"the checkpoint has {q.bits}-bit codes; stock vLLM serves compressed-tensors "
            f"sub-8-bit weights only as 4-bit (its 3-bit packing does not load and no CPU/GPU "
            f"kernel runs 2/3-bit codes); serve it with the quantease plugin, or convert with --bits 4"
        )
    with_outliers = {m: t[COL_IDX].numel() for m, t in ckpt.layers.items() if t[COL_IDX].numel()}
    if with_outliers:
        raise ExportError(
            f"{len(with_outliers)} of {len(ckpt.layers)} layers hold outliers "
            f"({sum(with_outliers.values())} in total, e.g. {next(iter(with_outliers))!r}); "
            "compressed-tensors has no sparse term, so the export would change the model: "
            "serve it with the quantease plugin, or convert with --outlier-fraction 0"
        )
    odd = [m for m, (out_f, _) in ckpt.shapes.items() if out_f % 8 and not q.sym]
    if odd:
        raise ExportError(
            f"layer {odd[0]!r} has an output size that is not a multiple of 8, which "
            "compressed-tensors zero points cannot pack"
        )


def export_group_size(ckpt: QuantizedCheckpoint) -> int:
    """One group width splitting every layer's groups and inputs exactly (-1 = per channel)."""
    if ckpt.qcfg.group_size == -1:
        return -1
    return math.gcd(ckpt.qcfg.group_size, *(in_f for _, in_f in ckpt.shapes.values()))


def compressed_tensors_config(
    bits: int, group_size: int, symmetric: bool, ignore: list[str]
) -> dict[str, Any]:
    """The ``quantization_config`` block vLLM's ``compressed-tensors`` method reads."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "ignore": ignore,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
    }


def export_compressed_tensors(
    model_dir: str | Path, output: str | Path, *, overwrite: bool = False
) -> ExportReport:
    """Write ``output``: the QuantEase checkpoint ``model_dir`` as compressed-tensors.

    Validates the source with ``read_quantized`` first; raises :class:`ExportError` when
    the checkpoint cannot be exported, ``FileExistsError`` when ``output`` exists and
    ``overwrite`` is false. The output appears atomically, complete or not at all.
    """
    source, output = Path(model_dir), Path(output)
    ckpt = read_quantized(source)
    check_exportable(ckpt)
    q = ckpt.qcfg
    group = export_group_size(ckpt)
    dtype = model_dtype(ckpt.hf_config, ckpt.others)
    tensors = dict(ckpt.others)
    for name, t in ckpt.layers.items():
        out_f, in_f = ckpt.shapes[name]
        layout = to_int4_layout(
            t[QWEIGHT], t[SCALES], None if q.sym else t[QZEROS], bits=q.bits,
            group_size=q.group_size, in_features=in_f, scale_dtype=dtype, int4_group=group,
        )
        tensors[f"{name}.weight_packed"] = layout.weight_packed
        tensors[f"{name}.weight_scale"] = layout.weight_scale
        if layout.weight_zero_point is not None:
            tensors[f"{name}.weight_zero_point"] = layout.weight_zero_point
        tensors[f"{name}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    unquantized = sorted(set(linear_shapes(ckpt.hf_config)) - set(ckpt.layers))
    config = {k: v for k, v in ckpt.hf_config.items() if k != "quantization_config"}
    config["quantization_config"] = compressed_tensors_config(q.bits, group, q.sym, unquantized)
    with staged_output(output, overwrite=overwrite) as staging:
        write_model_dir(staging, tensors, config, source)
    return ExportReport(source, output, len(ckpt.layers), group, q.sym, dtype)


def describe(report: ExportReport) -> str:
    grid = "per channel" if report.group_size == -1 else f"groups of {report.group_size}"
    return (
        f"qe-export: wrote {report.output} ({FORMAT} pack-quantized, 4-bit, {grid}, "
        f"{'symmetric' if report.symmetric else 'asymmetric'}, scales {report.scale_dtype}, "
        f"{report.layers} linears); serve it with stock vLLM: vllm serve {report.output}"
    )

