"""Corrupted copies of a good checkpoint: the cases every loader must refuse, by name.

Each case corrupts one copy of the ``good`` checkpoint (``tests/conftest.py``) the way a
bad copy, a buggy writer or a hand edit would, with the substrings every loader's message
must contain. Used by tests/converters/test_reliability_loader.py (transformers,
``qe-eval``) and tests/qe_vllm/test_reliability_vllm.py (vLLM).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qe_vllm.converters.checkpoint import INDEX, SINGLE_SHARD

LAYER = "model.layers.1.mlp.down_proj"  # 256 x 512, 4-bit, groups of 64, 1.5% outliers


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(ckpt: Path) -> None:
        tensors = load_file(str(ckpt / SINGLE_SHARD))
        edit(tensors)
        save_file(tensors, str(ckpt / SINGLE_SHARD), metadata={"format": "pt"})

    return apply


def _config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        edit(config)
        (ckpt / "config.json").write_text(json.dumps(config))

    return apply


def _bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(ckpt: Path) -> None:
        f = ckpt / SINGLE_SHARD
        f.write_bytes(edit(f.read_bytes()))

    return apply


def _drop_layer(t: dict[str, torch.Tensor]) -> None:
    for k in [k for k in t if k.startswith(LAYER + ".")]:
        del t[k]


def _swap_two_columns_in_a_row(t: dict[str, torch.Tensor]) -> None:
    ptr, cols = t[f"{LAYER}.outlier_row_ptr"], t[f"{LAYER}.outlier_col_idx"]
    row = int(torch.nonzero(ptr[1:] - ptr[:-1] >= 2)[0])
    a = int(ptr[row])
    cols[a], cols[a + 1] = cols[a + 1].clone(), cols[a].clone()


def _decreasing_row_ptr(t: dict[str, torch.Tensor]) -> None:
    ptr = t[f"{LAYER}.outlier_row_ptr"]
    ptr[10] = ptr[-1]  # still starts at 0 and ends at nnz, but row 10 "ends" after row 11


def _set(key: str, index: tuple, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{LAYER}.{key}"][index] = value

    return edit


def _shard_index(ckpt: Path) -> None:
    weight_map = {"lm_head.weight": "model-00002-of-00002.safetensors"}
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# id -> (corruption, substrings every loader's message must contain)
CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "missing-tensor": (
        _tensors(lambda t: t.pop(f"{LAYER}.qzeros")),
        (LAYER, f"missing tensor {LAYER}.qzeros"),
    ),
    "missing-layer": (_tensors(_drop_layer), (LAYER, f"missing tensor {LAYER}.qweight")),
    "wrong-dtype": (
        _tensors(lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"].float()})),
        (LAYER, "scales has dtype torch.float32, expected torch.float16"),
    ),
    "wrong-shape": (
        _tensors(lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"][:, :-1].clone()})),
        (LAYER, "qweight has shape (256, 63), expected (256, 64)"),
    ),
    "corrupt-header": (
        _bytes(lambda b: b[:8] + b"#" * 16 + b[24:]),
        ("is not a readable safetensors file", "invalid JSON in header", "corrupt or truncated"),
    ),
    "truncated-file": (
        _bytes(lambda b: b[: len(b) // 2]),
        ("is not a readable safetensors file", "corrupt or truncated"),
    ),
    "column-out-of-range": (
        _tensors(_set("outlier_col_idx", (0,), 9999)),
        (LAYER, "outlier_col_idx out of range [0, 512)", "max 9999"),
    ),
    "unsorted-columns": (
        _tensors(_swap_two_columns_in_a_row),
        (LAYER, "strictly increasing within each row"),
    ),
    "row-ptr-decreasing": (_tensors(_decreasing_row_ptr), (LAYER, "is not non-decreasing")),
    "row-ptr-wrong-end": (
        _tensors(_set("outlier_row_ptr", (-1,), 5)),
        (LAYER, "outlier_row_ptr must start at 0 and end at nnz"),
    ),
    "nan-outlier": (_tensors(_set("outlier_val", (3,), float("nan"))), (LAYER, "NaN or Inf")),
    "negative-scale": (
        _tensors(_set("scales", (0, 0), -1.0)),
        (LAYER, "scales must be finite and positive"),
    ),
    "zero-point-range": (
        _tensors(_set("qzeros", (0, 0), 200)),
        (LAYER, "qzeros exceed the 4-bit range"),
    ),
    "quantized-skipped-module": (
        _tensors(lambda t: t.update({"lm_head.qweight": torch.zeros(512, 32, dtype=torch.int32)})),
        ("'lm_head' has quantized tensors but is listed in modules_to_not_convert",),
    ),
    "format-version-newer": (
        _config(lambda c: c["quantization_config"].update(format_version=2)),
        ("format_version 2 is not supported", "upgrade qe-vllm"),
    ),
    "not-quantease": (
        _config(lambda c: c.pop("quantization_config")),
        ("is not a QuantEase checkpoint", "has no quantization_config", "holds QuantEase tensors"),
    ),
    "other-method": (
        _config(lambda c: c["quantization_config"].update(quant_method="awq")),
        ("is not a QuantEase checkpoint", "declares quant_method 'awq'", "restore the config.json"),
    ),
    "config-not-json": (
        lambda ckpt: (ckpt / "config.json").write_text("{ not json"),
        ("config.json is not valid JSON",),
    ),
    "shard-missing": (_shard_index, ("model-00002-of-00002.safetensors", "is missing")),
}


def broken(good: Path, tmp_path: Path, case: str) -> Path:
    """A copy of ``good`` under ``tmp_path`` with ``case``'s corruption applied."""
    ckpt = tmp_path / case
    shutil.copytree(good, ckpt)
    CASES[case][0](ckpt)
    return ckpt


def assert_message(text: str, case: str) -> None:
    """``text`` (an exception, stderr or a server log) holds every substring of ``case``."""
    for part in CASES[case][1]:
        assert part in text, (case, part, text[-3000:])
