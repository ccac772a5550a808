"""Write and read QuantEase checkpoints on disk, atomically.

A checkpoint is a Hugging Face model directory whose quantized linears ``P`` are
stored as ``P.qweight``, ``P.scales``, ``P.qzeros`` (asymmetric grids only) and
the CSR outlier triple ``P.outlier_row_ptr`` / ``P.outlier_col_idx`` /
``P.outlier_val`` (``qe_vllm.format`` defines their meaning), next to every other
tensor as in the original, with ``quantization_config`` in ``config.json``.

Atomicity: everything is written into a hidden sibling directory, fsynced, and
renamed into place only when complete, with ``config.json`` written last. A crash
at any point leaves either the old state or a hidden ``.NAME.partial`` directory
that no loader mistakes for a model (the conversion pipeline keeps its resume
state there). A failed write (disk full, file-size limit) surfaces as an ``OSError``
naming the file, whatever library did the writing.

Reading validates before anything is loaded in bulk: :func:`validate_checkpoint`
checks the safetensors headers (names, dtypes, shapes) against the geometry in
``config.json`` and the small tensors' values (scales, zero points, CSR outliers),
so every loader — transformers, ``qe-eval``, and vLLM through the quantease
method's ``maybe_update_config`` — fails with one message naming the layer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qe_vllm.format import (
    OUTLIER_TENSORS,
    QUANT_METHOD,
    QWEIGHT,
    QZEROS,
    SCALES,
    CheckpointFormatError,
    QuantEaseConfig,
    dense_weight,
    validate_linear,
)

CONFIG = "config.json"
SINGLE_SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
LAYER_TENSORS = (QWEIGHT, SCALES, QZEROS, *OUTLIER_TENSORS)
# Files next to the weights that a served model needs: tokenizer, chat template, generation defaults, licence.
SIDE_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.*",
    "generation_config.json",
    "LICENSE*",
    "NOTICE*",
)


# --------------------------------------------------------------------------- directories


def partial_dir(output: Path) -> Path:
    """The hidden sibling where a conversion into ``output`` is staged (and can be resumed)."""
    return output.parent / f".{output.name}.partial"


def check_output(output: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber ``output`` or an interrupted run into it (cheap: call before any work)."""
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {output} already exists; pass --overwrite to replace it"
        )
    staging = partial_dir(output)
    if staging.exists() and not resume and not overwrite:
        raise FileExistsError(
            f"an interrupted conversion into {output} was left at {staging}; "
            "pass --resume to continue it or --overwrite to start over"
        )


def prepare_partial(output: Path, *, overwrite: bool, resume: bool) -> Path:
    """Create (or, with ``resume``, reuse) the staging directory for ``output``."""
    check_output(output, overwrite=overwrite, resume=resume)
    staging = partial_dir(output)
    if staging.exists() and not resume:
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def publish(staging: Path, output: Path) -> None:
    """fsync ``staging`` and rename it to ``output`` (replacing an existing ``output``)."""
    for f in staging.iterdir():
        _fsync(f)
    _fsync(staging)
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
    os.rename(staging, output)
    _fsync(output.parent)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def staged_output(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """A fresh hidden temp directory that becomes ``output`` on success and vanishes on failure."""
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {output} already exists; pass --overwrite to replace it"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield staging
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writing


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a writer's failure into an ``OSError`` naming ``path``.

    safetensors reports a full disk as ``SafetensorError`` and ``torch.save`` as
    ``RuntimeError``; callers (the CLI) handle ``OSError`` only, so without this a
    failed save would end in a traceback instead of one line.
    """
    try:
        yield
    except (SafetensorError, RuntimeError) as e:
        raise OSError(f"writing {path} failed ({e}); check free disk space and retry") from None


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file (a separate function so tests can make it fail mid-save)."""
    with writing(path):
        save_file(tensors, str(path), metadata={"format": "pt"})


def write_weights(
    staging: Path,
    sizes: dict[str, int],
    read: Callable[[list[str]], dict[str, torch.Tensor]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Write tensors of byte ``sizes`` into shards of at most ``max_shard_bytes``, one shard in memory at a time.

    ``read(names)`` returns those tensors; it is called once per shard, so a
    converter whose tensors live on disk never holds more than one shard. Names go
    into shards in sorted order; more than one shard gets Hugging Face's
    ``model-0000i-of-0000N.safetensors`` names and a ``model.safetensors.index.json``.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(sizes):
        if shards[-1] and size + sizes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += sizes[name]
    if len(shards) == 1:
        _write_shard(staging / SINGLE_SHARD, read(shards[0]))
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(staging / file, read(shard))
        weight_map.update(dict.fromkeys(shard, file))
    _write_json(staging / INDEX, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})


def finish_model_dir(staging: Path, hf_config: dict[str, Any], source_dir: Path) -> None:
    """Side files copied from ``source_dir``, then ``config.json``: written last, it marks the weights complete."""
    for pattern in SIDE_FILES:
        for f in sorted(source_dir.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, staging / f.name)
    _write_json(staging / CONFIG, hf_config)


def write_model_dir(
    staging: Path,
    tensors: dict[str, torch.Tensor],
    hf_config: dict[str, Any],
    source_dir: Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Write in-memory ``tensors`` (sharded), side files copied from ``source_dir``, and ``config.json`` last."""
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    write_weights(staging, sizes, lambda names: {n: tensors[n] for n in names}, max_shard_bytes)
    finish_model_dir(staging, hf_config, source_dir)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def quantized_config(hf_config: dict[str, Any], qcfg: QuantEaseConfig) -> dict[str, Any]:
    """The original ``config.json`` dict with ``quantization_config`` set."""
    return {**hf_config, "quantization_config": qcfg.to_dict()}


# --------------------------------------------------------------------------- reading


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {CONFIG}: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path} is not valid JSON ({e})") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The ``.safetensors`` files of a model directory; every shard its index names must exist."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no .safetensors weights")
    index = model_dir / INDEX
    if index.is_file():
        try:
            named = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointFormatError(f"{index} is not a valid safetensors index ({e!r})") from None
        if missing := sorted(named - {f.name for f in files}):
            raise CheckpointFormatError(
                f"{model_dir}: shard {missing[0]} named in {INDEX} is missing; "
                "copy the complete checkpoint directory"
            )
    return files


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` whose header errors name the file (raw ``SafetensorError`` does not)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointFormatError(
            f"{path} is not a readable safetensors file ({e}): it is corrupt or truncated; "
            "replace it with a complete copy"
        ) from None
    with handle as f:
        yield f


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of a model directory (CPU)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        with open_safetensors(f) as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def linear_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every ``nn.Linear`` of the model, built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hf_config)
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def model_dtype(hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The model's storage dtype: from config.json, else that of its first floating tensor."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next(t.dtype for _, t in sorted(tensors.items()) if t.is_floating_point())


@dataclass
class QuantizedCheckpoint:
    """A QuantEase checkpoint read back and validated."""

    hf_config: dict[str, Any]
    qcfg: QuantEaseConfig
    layers: dict[str, dict[str, torch.Tensor]]
    """Quantized linears: module name -> {tensor name without prefix: tensor}."""
    shapes: dict[str, tuple[int, int]]
    """Quantized linears: module name -> (out_features, in_features)."""
    others: dict[str, torch.Tensor]
    """Every other tensor (embeddings, norms, biases, untied lm_head) as stored."""


# safetensors header dtype names -> torch dtypes (those a checkpoint can hold).
_HEADER_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class CheckpointGeometry:
    """What :func:`validate_checkpoint` established about a checkpoint directory."""

    hf_config: dict[str, Any]
    qcfg: QuantEaseConfig
    shapes: dict[str, tuple[int, int]]
    """Quantized linears: module name -> (out_features, in_features)."""


def validate_checkpoint(model_dir: Path) -> CheckpointGeometry:
    """Check a QuantEase checkpoint directory against the format, loading only the small tensors.

    Headers give every tensor's name, dtype and shape; the geometry of each linear
    comes from ``config.json`` (the model built on the meta device). Every linear
    not in ``modules_to_not_convert`` must carry exactly the tensors of
    ``qe_vllm.format.expected_tensors``; scales, zero points and the CSR outliers
    are read and checked in full. ``qweight`` is only checked from its header:
    every bit pattern is a valid code. Raises :class:`CheckpointFormatError` (or
    ``FileNotFoundError``) with one message naming the directory and the layer.
    """
    model_dir = Path(model_dir)
    hf_config = read_config(model_dir)
    small = tuple("." + t for t in LAYER_TENSORS if t != QWEIGHT)
    stored = read_headers(model_dir, load=lambda k: k.endswith(small))
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    if method != QUANT_METHOD:
        what = "has no quantization_config" if method is None else f"declares quant_method {method!r}"
        packed = next((k for k in sorted(stored) if k.endswith("." + QWEIGHT)), None)
        fix = (
            f"but it holds QuantEase tensors ({packed}): restore the config.json qe-convert wrote"
            if packed
            else f"load it without the {QUANT_METHOD} method, or convert it with qe-convert first"
        )
        raise CheckpointFormatError(
            f"{model_dir} is not a QuantEase checkpoint: its config.json {what}, {fix}"
        )
    try:
        qcfg = QuantEaseConfig.from_dict(hf_config["quantization_config"])
        all_shapes = linear_shapes(hf_config)
        shapes = {m: s for m, s in all_shapes.items() if not qcfg.is_skipped(m)}
        suffixes = tuple("." + t for t in LAYER_TENSORS)
        owners = {k.rsplit(".", 1)[0] for k in stored if k.endswith(suffixes)}
        if stray := sorted(owners - set(shapes)):
            why = "listed in modules_to_not_convert" if stray[0] in all_shapes else "no linear layer"
            raise CheckpointFormatError(f"layer {stray[0]!r} has quantized tensors but is {why}")
        for m, (out_f, in_f) in shapes.items():
            tensors = {t: stored[f"{m}.{t}"] for t in LAYER_TENSORS if f"{m}.{t}" in stored}
            validate_linear(m, tensors, qcfg, out_f, in_f)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"invalid QuantEase checkpoint {model_dir}: {e}") from None
    return CheckpointGeometry(hf_config, qcfg, shapes)


def read_headers(
    model_dir: Path, load: Callable[[str], bool] = lambda name: False
) -> dict[str, torch.Tensor]:
    """Every stored tensor: read if ``load(name)``, else a meta tensor of its dtype and shape."""
    return stored_tensors(model_dir, load)[0]


def stored_tensors(
    model_dir: Path, load: Callable[[str], bool] = lambda name: False
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """:func:`read_headers`, and which safetensors file holds each tensor; each file opened once."""
    out: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}
    for f in weight_files(model_dir):
        with open_safetensors(f) as sf:
            for k in sf.keys():
                if k in files:
                    raise CheckpointFormatError(f"tensor {k} is stored twice, in {files[k].name} and {f.name}")
                files[k] = f
                out[k] = sf.get_tensor(k) if load(k) else header_tensor(sf, k, f)
    return out, files


def header_tensor(sf: Any, name: str, file: Path) -> torch.Tensor:
    """A meta tensor with the dtype and shape the header of the open safetensors ``sf`` gives ``name``."""
    sl = sf.get_slice(name)
    dtype = _HEADER_DTYPES.get(sl.get_dtype())
    if dtype is None:
        raise CheckpointFormatError(f"tensor {name} in {file.name} has unknown dtype {sl.get_dtype()}")
    return torch.empty(sl.get_shape(), dtype=dtype, device="meta")


def read_quantized(model_dir: Path) -> QuantizedCheckpoint:
    """Read a QuantEase checkpoint after :func:`validate_checkpoint` has accepted it."""
    geometry = validate_checkpoint(Path(model_dir))
    tensors = read_tensors(model_dir)
    layers = {
        m: {t: tensors.pop(f"{m}.{t}") for t in LAYER_TENSORS if f"{m}.{t}" in tensors}
        for m in geometry.shapes
    }
    return QuantizedCheckpoint(geometry.hf_config, geometry.qcfg, layers, geometry.shapes, tensors)


def load_quantized_state(
    model_dir: Path,
) -> tuple[QuantEaseConfig, dict[str, dict[str, torch.Tensor]]]:
    """``(config, {module: tensors})`` of a checkpoint, every layer validated with ``validate_linear``."""
    ckpt = read_quantized(Path(model_dir))
    return ckpt.qcfg, ckpt.layers


def dense_reference(model_dir: Path, out_dir: Path, *, overwrite: bool = False) -> None:
    """Write a plain HF checkpoint whose linears hold the dequantized effective weights.

    The oracle for tests: any correct loader of the QuantEase checkpoint must
    behave like this dense model (up to the rounding of the effective weights to
    the model dtype, which this checkpoint stores).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    ckpt = read_quantized(model_dir)
    dtype = model_dtype(ckpt.hf_config, ckpt.others)
    tensors = dict(ckpt.others)
    for m, t in ckpt.layers.items():
        tensors[f"{m}.weight"] = dense_weight(t, ckpt.qcfg, ckpt.shapes[m][1]).to(dtype)
    config = {k: v for k, v in ckpt.hf_config.items() if k != "quantization_config"}
    with staged_output(out_dir, overwrite=overwrite) as staging:
        write_model_dir(staging, tensors, config, model_dir)
