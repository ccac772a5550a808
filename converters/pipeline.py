"""Layer-wise conversion of a Hugging Face causal LM into a QuantEase checkpoint: the driver.

The data path, one module a step:

1. **calibrate**: calibration windows (``converters/calibration.py``); block 0's
   inputs and how every block is called, found from the model
   (``converters/walking.py``);
2. **solve**, block by block (``converters/block.py``): each group of linears
   sharing an input gets its Σ (``converters/statistics.py``) and is solved
   (``converters/solvers.py``); the block's outputs feed the next block;
3. **stage**: every finished block is saved to the resume state
   (``converters/staging.py``), so ``resume=True`` continues an interrupted run,
   also one killed with SIGKILL at any instant;
4. **pack and save**: the checkpoint is assembled from those files (so a resumed
   run writes the same bytes as an uninterrupted one) and published atomically
   (``converters/checkpoint.py``).

Everything a conversion can refuse is checked before any work: the model kind,
bits and group sizes the format cannot hold, weights beyond float16, NaN/Inf.
Only one block sits on the compute device at a time (in float32, TF32 off).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qe_vllm.converters import distributed, walking
from qe_vllm.converters.block import FLOAT16_MAX, quantize_block
from qe_vllm.converters.calibration import Calibration, calibration_set, describe
from qe_vllm.converters.checkpoint import (
    MAX_SHARD_BYTES,
    check_output,
    finish_model_dir,
    partial_dir,
    prepare_partial,
    publish,
    quantized_config,
    read_config,
    write_weights,
)
from qe_vllm.converters.hf_loading import resolve_model
from qe_vllm.converters.objective import exact_matmul
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.source import SourceModel, TensorFacts
from qe_vllm.converters.staging import WorkDir
from qe_vllm.converters.walking import Layout
from qe_vllm.format import COL_IDX, QuantEaseConfig

log = logging.getLogger(__name__)

OUTLIER_DTYPE = "float16"


@dataclass
class ConvertReport:
    """What a conversion produced, for the CLI summary."""

    output: Path
    source: Path
    architecture: str
    qcfg: QuantEaseConfig
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    nnz: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def check_fits(opts: ConvertOptions, hf_config: dict[str, Any], weights: dict[str, TensorFacts]) -> None:
    """Refuse settings or weights the format cannot honour, before any work.

    A group wider than a layer's rows would silently mean "per channel"; windows
    longer than the model's learned positions (OPT) would fail deep inside the
    first forward pass; a weight beyond the float16 range of scales and outlier
    values would be stored as Inf (found by tests/converters/test_fuzz_solvers.py).
    """
    if weights:
        name, narrowest = min(((n, w.shape[1]) for n, w in weights.items()), key=lambda nw: nw[1])
        if opts.group_size > narrowest:
            raise ValueError(
                f"--group-size {opts.group_size} is wider than {name}, which has {narrowest} input "
                f"features; use a group size <= {narrowest} or -1 (one group per row)"
            )
    for name, w in weights.items():
        if w.peak > FLOAT16_MAX:
            raise ValueError(
                f"{name} holds weights up to {w.peak:.4g}, beyond the float16 range ({FLOAT16_MAX:g}) "
                "of QuantEase scales and outliers; this model cannot be stored in the format"
            )
    limit = hf_config.get("max_position_embeddings")
    if opts.calibrated and isinstance(limit, int) and opts.seqlen > limit:
        raise ValueError(
            f"--seqlen {opts.seqlen} exceeds the model's max_position_embeddings={limit}; "
            f"use --seqlen {limit} or less"
        )


def check_finite(facts: dict[str, TensorFacts]) -> None:
    for name, t in facts.items():
        if not t.finite:
            raise ValueError(f"the model's tensor {name} holds NaN or Inf; refusing to quantize it")


def quant_config(opts: ConvertOptions, provenance: dict[str, Any] | None = None) -> QuantEaseConfig:
    return QuantEaseConfig(
        bits=opts.bits,
        group_size=opts.group_size,
        sym=opts.sym,
        outlier_fraction=opts.outlier_fraction,
        outlier_structure=opts.outlier_structure,
        outlier_dtype=OUTLIER_DTYPE,
        modules_to_not_convert=list(walking.KEEP),
        provenance=provenance or {},
    )


def provenance(
    opts: ConvertOptions,
    model: str,
    arch_name: str,
    errors: dict[str, float | None],
    calib: Calibration | None = None,
) -> dict[str, Any]:
    """Every option (``asdict``), with the calibration source resolved (path, dataset or bundle)."""
    options = asdict(opts)
    if opts.calibrated:
        options["calib_data"] = describe(opts.calib_data)
    return {
        "method": opts.method,
        "source_model": model,
        "architecture": arch_name,
        "options": options,
        "calibration": None if calib is None else calib.summary(),
        "qe_vllm_version": version("qe-vllm"),
        "relative_error": errors,
    }


def convert(
    model: str,
    output: Path,
    opts: ConvertOptions,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> ConvertReport:
    """Convert ``model`` (local directory or cached hub id) into a QuantEase checkpoint at ``output``.

    The model is never resident as a whole: one block's weights at a time
    (``converters/source.py``), and the output is written one shard of at most
    ``max_shard_bytes`` at a time.
    """
    start_time = time.perf_counter()
    opts.check()
    output = Path(output).expanduser().resolve()
    source = resolve_model(model)
    hf_config = read_config(source)
    if quantized := (hf_config.get("quantization_config") or {}).get("quant_method"):
        raise ValueError(
            f"{source} is already quantized ({quantized}); pass the original model to --model"
        )
    walking.check_supported(hf_config)
    ranks = distributed.current()
    arch_name = ", ".join(hf_config.get("architectures") or [str(hf_config.get("model_type"))])
    quant_config(opts)  # validates bits / group size / outliers before any work
    dev = pick_device(distributed.device_of(device, ranks))
    if ranks.leader:  # the others would see the staging folder the leader is creating
        check_output(output, overwrite=overwrite, resume=resume)
    src = SourceModel(source, hf_config)
    facts = src.scan()  # one tensor at a time
    check_finite(facts)

    from transformers import AutoTokenizer

    calib = None
    if opts.calibrated:  # before the model: bad data fails fast
        tokenizer = AutoTokenizer.from_pretrained(source)
        calib = calibration_set(
            tokenizer, opts.calib_data, opts.nsamples, opts.seqlen, opts.seed, opts.calib_format
        )
        if ranks.leader:
            log.info(calib.summary())
        ranks, mine = ranks.split(calib.windows.shape[0])
        windows = calib.windows[mine]
    net = src.skeleton()
    lay = walking.layout(net)
    blocks = net.get_submodule(lay.blocks)
    names = [f"{lay.blocks}.{i}.{name}" for i in range(len(blocks)) for name in lay.linears]
    if missing := [n for n in names if f"{n}.weight" not in facts]:
        raise ValueError(
            f"{source}: no tensor {missing[0]}.weight; its tensor names do not follow the "
            f"module names of {arch_name}"
        )
    check_fits(opts, hf_config, {n: facts[f"{n}.weight"] for n in names})
    if ranks.leader:
        log.info("%d blocks at %s, each with linears %s", len(blocks), lay.blocks, ", ".join(lay.linears))
    staging = partial_dir(output)
    if ranks.leader:  # the others open the folders the leader made
        prepare_partial(output, overwrite=overwrite, resume=resume)
        work = WorkDir(staging / "_work", {"model": str(source), **asdict(opts)}, ranks)
    ranks.barrier("preparing the output folder")
    if not ranks.leader:
        work = WorkDir(staging / "_work", {"model": str(source), **asdict(opts)}, ranks)
    first = work.next_block
    qcfg = quant_config(opts)
    acts, calls = None, [None] * len(blocks)
    with torch.no_grad(), exact_matmul():
        if opts.calibrated and first == 0:
            # everything before the blocks (embeddings, rotary tables); never the blocks or the head
            with src.loaded(net, "", skip=(f"{lay.blocks}.", *walking.output_head(net))):
                hidden, calls = walking.capture_block_inputs(net, lay.blocks, windows, dev)
            acts = {"hidden": hidden}
            if opts.propagation > 0:
                acts["hidden_fp"] = hidden.clone()
            if ranks.leader:
                work.save_calls(calls)
        elif opts.calibrated and first < len(blocks):
            acts, calls = work.load_acts(first)
        bar = tqdm(range(first, len(blocks)), desc="blocks", initial=first, total=len(blocks), disable=not ranks.leader)
        for i in bar:
            label = f"{lay.blocks}.{i}"
            with src.loaded(blocks[i], f"{label}."):
                results, errors = quantize_block(blocks[i], opts, dev, acts, calls[i], label, ranks)
            tensors = {
                f"{n}.{k}": v for n, r in results.items() for k, v in r.to_tensors(qcfg).items()
            }
            work.save_block(i, tensors, errors, acts)

    if not ranks.leader:  # the leader writes the checkpoint
        ranks.barrier("process 0 writes the checkpoint")
        return ConvertReport(output=output, source=source, architecture=arch_name, qcfg=qcfg)
    stored, read, errors = checkpoint_tensors(work, src, lay, len(blocks))
    report = ConvertReport(
        output=output,
        source=source,
        architecture=arch_name,
        qcfg=quant_config(opts, provenance(opts, model, arch_name, errors, calib)),
        shapes={n: facts[f"{n}.weight"].shape for n in names},
        nnz={n: stored[f"{n}.{COL_IDX}"].numel() for n in names},
    )
    write_weights(staging, {n: t.numel() * t.element_size() for n, t in stored.items()}, read, max_shard_bytes)
    finish_model_dir(staging, quantized_config(hf_config, report.qcfg), source)
    shutil.rmtree(work.path)
    publish(staging, output)
    ranks.barrier("process 0 writes the checkpoint")
    report.seconds = time.perf_counter() - start_time
    return report


def checkpoint_tensors(
    work: WorkDir, src: SourceModel, lay: Layout, n_blocks: int
) -> tuple[dict[str, torch.Tensor], Callable[[list[str]], dict[str, torch.Tensor]], dict[str, float | None]]:
    """The checkpoint's tensors as meta tensors (dtype, shape) and a reader, and the per-layer errors.

    The checkpoint is the original tensors with each quantized ``.weight``
    replaced by its block's saved tensors. They are always read from the saved
    block files, resumed run or not: that is what makes a resumed checkpoint
    byte-identical to an uninterrupted one. Only headers are read up front;
    ``read`` fetches one shard's worth when the writer asks.
    """
    stored = dict(src.headers)
    saved: dict[str, tuple[int, str]] = {}  # checkpoint name -> (block, name in its file)
    errors: dict[str, float | None] = {}
    for i in range(n_blocks):
        prefix = f"{lay.blocks}.{i}."
        for name in lay.linears:
            del stored[f"{prefix}{name}.weight"]
        tensors, block_errors = work.block_contents(i)
        for k, t in tensors.items():
            saved[prefix + k] = (i, k)
            stored[prefix + k] = t
        errors.update({prefix + k: v for k, v in block_errors.items()})

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        out = src.read(n for n in names if n not in saved)
        per_block: dict[int, list[str]] = {}
        for n in names:
            if n in saved:
                per_block.setdefault(saved[n][0], []).append(n)
        for i, ns in per_block.items():
            got = work.read_block(i, [saved[n][1] for n in ns])
            out.update({n: got[saved[n][1]] for n in ns})
        return out

    return stored, read, errors
