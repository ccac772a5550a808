"""Layer-wise conversion of a Hugging Face causal LM into a QuantEase checkpoint.

GPTQ-style sequential calibration (docs/ALGORITHM.md): the inputs of block 0
are captured once, then block by block, group by group of linears sharing an
input (q/k/v; o; gate/up; down):

1. forward pre-hooks accumulate the group's statistics Σ = Σ x xᵀ
   (``converters/statistics.py``) on the block with every earlier group already
   quantized (true-sequential; or, with ``true_sequential=False``, all groups on
   the unquantized block); with error propagation a full-precision copy of the
   block, fed the full-precision model's activations, gives the cross terms;
2. every linear of the group is solved (``converters/solvers.py``) and its
   quantized effective weight Ŵ is written back into the block;
3. the block is re-run, so the next block is calibrated on the outputs of the
   *quantized* block, as it will see them at inference.

Only one block sits on the compute device at a time (in float32, TF32 off);
activations stay on the CPU. Per-layer relative reconstruction error
‖(W−Ŵ)X‖²/‖WX‖² = tr(DΣDᵀ)/tr(WΣWᵀ) is logged and stored in the provenance.

Every finished block is saved to a work directory inside the staging directory
(solved tensors, next block's inputs), so ``resume=True`` continues an
interrupted run — also one killed with SIGKILL at any instant, since every file
is replaced atomically and the progress marker is written last; the final
checkpoint is always assembled from those files, so a resumed run writes the
same bytes as an uninterrupted one.

Calibration statistics are checked as they are formed: a Σ holding NaN or Inf
(a model that overflows float32 on the calibration text) stops the run with the
block and layer named, instead of feeding a solver garbage.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qe_vllm.converters import walking
from qe_vllm.converters.calibration import Calibration, calibration_set, describe
from qe_vllm.converters.checkpoint import (
    check_output,
    prepare_partial,
    publish,
    quantized_config,
    read_config,
    read_tensors,
    write_model_dir,
    writing,
)
from qe_vllm.converters.hf_loading import resolve_model
from qe_vllm.converters.objective import exact_matmul
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.result import QuantResult
from qe_vllm.converters.solvers import solve
from qe_vllm.converters.statistics import FullPrecisionInputs, block_statistics
from qe_vllm.converters.walking import BlockCall, Layout, block_linears, borrowed, linear_groups, run_block
from qe_vllm.format import COL_IDX, QuantEaseConfig

log = logging.getLogger(__name__)

OUTLIER_DTYPE = "float16"
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # largest storable scale or outlier value


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


# --------------------------------------------------------------------------- solving


def check_solution(name: str, res: QuantResult, opts: ConvertOptions, w: torch.Tensor) -> None:
    """A solver's output must be storable: codes on the grid, finite weights, float16 outliers.

    Checked before the solution is written back into the block, so a solver that
    blew up stops the run naming the layer instead of writing Inf into the
    checkpoint or poisoning the next block's calibration. (Found by
    tests/converters/test_fuzz_solvers.py: near the float16 limit, GPTQ's error compensation
    can push the outliers it holds out past float16.)
    """
    problems = []
    if int(res.codes.min()) < 0 or int(res.codes.max()) > 2**opts.bits - 1:
        problems.append("codes off the grid")
    if not bool(torch.isfinite(res.weight(opts.group_size)).all()):
        problems.append("NaN or Inf weights")
    if res.outliers is not None and float(res.outliers.abs().max()) > FLOAT16_MAX:
        problems.append("outliers beyond the float16 range")
    if problems:
        raise ValueError(
            f"the {opts.method} solution for {name} cannot be stored ({', '.join(problems)}; "
            f"largest |weight| {float(w.abs().max()):.4g}); try another --method or --outlier-fraction"
        )


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, sigma: torch.Tensor) -> float:
    """‖(W−Ŵ)X‖²/‖WX‖² from Σ = X Xᵀ (float64)."""
    w = w.double()
    d = w - w_hat.double()
    den = float(((w @ sigma) * w).sum())
    return float(((d @ sigma) * d).sum()) / den if den > 0 else 0.0


# --------------------------------------------------------------------------- running blocks


def fits_in_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` more of host memory leave three quarters of what is available free.

    Linux's ``MemAvailable``; elsewhere, no (the caller then takes its slower,
    memory-free path, which gives the same result).
    """
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return False
    return nbytes <= kib * 1024 // 4


def quantize_block(
    block: torch.nn.Module,
    opts: ConvertOptions,
    device: torch.device,
    acts: dict[str, torch.Tensor] | None,
    call: BlockCall | None,
    label: str,
) -> tuple[dict[str, QuantResult], dict[str, float | None]]:
    """Solve every linear of one block; with calibration, advance ``acts`` in place to its outputs.

    ``acts["hidden"]`` are the block's inputs in the model quantized so far;
    with error propagation ``acts["hidden_fp"]`` are the same samples' inputs
    in the full-precision model, which a full-precision copy of the block
    advances alongside. The linears are grouped by the input they share
    (``converters/walking.py``, on the first sample). True-sequential: each group
    is calibrated on the block with every earlier group already quantized;
    otherwise all groups are calibrated on the unquantized block.
    """
    results: dict[str, QuantResult] = {}
    errors: dict[str, float | None] = {}
    with borrowed([block], device):
        if acts is None:  # nothing to calibrate: every linear on its own
            groups = tuple((name,) for name in block_linears(block))
        else:
            call = walking.to_device(call, device)
            groups = linear_groups(block, acts["hidden"][:1].to(device), call)
        bar = tqdm(total=sum(map(len, groups)), desc=label, leave=False)
        fp = None
        if acts is not None and "hidden_fp" in acts:
            firsts = [g[0] for g in groups]
            width = sum(block.get_submodule(n).in_features for n in firsts)
            fp = FullPrecisionInputs(
                copy.deepcopy(block), acts["hidden_fp"], call, device, firsts,
                cache=fits_in_memory(acts["hidden_fp"][..., 0].numel() * width * 4),
            )
        stages = [[g] for g in groups] if opts.true_sequential else [groups]
        for stage in stages:
            stats = {}
            if acts is not None:
                stats = block_statistics(
                    block, [g[0] for g in stage], acts["hidden"], call, device, fp_inputs=fp, label=label
                )
            for group in stage:
                for name in group:
                    lin = block.get_submodule(name)
                    w = lin.weight.detach()
                    st = stats.get(group[0])
                    res = solve(w, st, opts)
                    check_solution(f"{label}.{name}", res, opts, w)
                    w_hat = res.weight(opts.group_size).to(device)
                    errors[name] = None if st is None else relative_error(w, w_hat, st.sigma)
                    if errors[name] is not None:
                        log.info("%s.%s: relative reconstruction error %.4e", label, name, errors[name])
                    lin._parameters["weight"] = torch.nn.Parameter(w_hat, requires_grad=False)
                    results[name] = res
                    bar.update()
        if acts is not None:
            run_block(block, acts["hidden"], call, into=acts["hidden"])
            if fp is not None:
                fp.finish()
        bar.close()
    return results, errors


# --------------------------------------------------------------------------- resume state


class WorkDir:
    """Per-block state of a conversion, inside the staging directory, written atomically."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        run = path / "run.json"
        if run.exists():
            previous = json.loads(run.read_text())
            if previous != fingerprint:
                changed = sorted(
                    k
                    for k in fingerprint.keys() | previous.keys()
                    if previous.get(k) != fingerprint.get(k)
                )
                raise ValueError(
                    f"the interrupted conversion at {path.parent} used different settings ({', '.join(changed)}); "
                    "pass --overwrite to start over"
                )
        else:
            _replace_text(run, json.dumps(fingerprint, sort_keys=True))

    @property
    def next_block(self) -> int:
        progress = self.path / "progress.json"
        return json.loads(progress.read_text())["next_block"] if progress.exists() else 0

    def save_calls(self, calls: list[BlockCall]) -> None:
        tmp = self.path / "block_calls.pt.tmp"
        with writing(tmp):
            torch.save([(c.args, c.kwargs) for c in calls], tmp)
        os.replace(tmp, self.path / "block_calls.pt")

    def load_acts(self, i: int) -> tuple[dict[str, torch.Tensor], list[BlockCall]]:
        """Inputs of block ``i`` (saved when block ``i - 1`` finished) and how every block is called."""
        acts = load_file(str(self._inputs_file(i)))
        calls = torch.load(self.path / "block_calls.pt", weights_only=True)
        return acts, [BlockCall(args, kwargs) for args, kwargs in calls]

    def save_block(
        self,
        i: int,
        tensors: dict[str, torch.Tensor],
        errors: dict[str, float | None],
        acts: dict[str, torch.Tensor] | None,
    ) -> None:
        """Block ``i`` done: its tensors, the next block's inputs, the progress marker, cleanup.

        The inputs are named by the block they feed, so a kill between any two
        steps leaves the marker pointing at a block whose inputs are on disk
        (never at block ``i`` with block ``i``'s *outputs* in place of its inputs).
        """
        _save_atomic(self._block_file(i), tensors, {"errors": json.dumps(errors, sort_keys=True)})
        if acts is not None:
            _save_atomic(self._inputs_file(i + 1), acts, {})
        _replace_text(self.path / "progress.json", json.dumps({"next_block": i + 1}))
        self._inputs_file(i).unlink(missing_ok=True)

    def load_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
        with safe_open(str(self._block_file(i)), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["errors"])

    def _block_file(self, i: int) -> Path:
        return self.path / f"block_{i:05d}.safetensors"

    def _inputs_file(self, i: int) -> Path:
        return self.path / f"inputs_{i:05d}.safetensors"


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- driver


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def check_fits(
    opts: ConvertOptions, hf_config: dict[str, Any], weights: dict[str, torch.Tensor]
) -> None:
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
        peak = float(w.abs().max())
        if peak > FLOAT16_MAX:
            raise ValueError(
                f"{name} holds weights up to {peak:.4g}, beyond the float16 range ({FLOAT16_MAX:g}) "
                "of QuantEase scales and outliers; this model cannot be stored in the format"
            )
    limit = hf_config.get("max_position_embeddings")
    if opts.calibrated and isinstance(limit, int) and opts.seqlen > limit:
        raise ValueError(
            f"--seqlen {opts.seqlen} exceeds the model's max_position_embeddings={limit}; "
            f"use --seqlen {limit} or less"
        )


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
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
) -> ConvertReport:
    """Convert ``model`` (local directory or cached hub id) into a QuantEase checkpoint at ``output``."""
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
    arch_name = ", ".join(hf_config.get("architectures") or [str(hf_config.get("model_type"))])
    quant_config(opts)  # validates bits / group size / outliers before any work
    dev = pick_device(device)
    check_output(output, overwrite=overwrite, resume=resume)
    original = read_tensors(source)
    check_finite(original)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = None
    if opts.calibrated:  # before the model: bad data fails fast
        tokenizer = AutoTokenizer.from_pretrained(source)
        calib = calibration_set(
            tokenizer, opts.calib_data, opts.nsamples, opts.seqlen, opts.seed, opts.calib_format
        )
        log.info(calib.summary())
        windows = calib.windows
    net = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    net.eval()
    lay = walking.layout(net)
    blocks = net.get_submodule(lay.blocks)
    names = [f"{lay.blocks}.{i}.{name}" for i in range(len(blocks)) for name in lay.linears]
    if missing := [n for n in names if f"{n}.weight" not in original]:
        raise ValueError(
            f"{source}: no tensor {missing[0]}.weight; its tensor names do not follow the "
            f"module names of {arch_name}"
        )
    check_fits(opts, hf_config, {n: original[f"{n}.weight"] for n in names})
    log.info("%d blocks at %s, each with linears %s", len(blocks), lay.blocks, ", ".join(lay.linears))
    staging = prepare_partial(output, overwrite=overwrite, resume=resume)
    work = WorkDir(staging / "_work", {"model": str(source), **asdict(opts)})
    first = work.next_block
    qcfg = quant_config(opts)
    acts, calls = None, [None] * len(blocks)
    with torch.no_grad(), exact_matmul():
        if opts.calibrated and first == 0:
            hidden, calls = walking.capture_block_inputs(net, lay.blocks, windows, dev)
            acts = {"hidden": hidden}
            if opts.propagation > 0:
                acts["hidden_fp"] = hidden.clone()
            work.save_calls(calls)
        elif opts.calibrated and first < len(blocks):
            acts, calls = work.load_acts(first)
        for i in tqdm(range(first, len(blocks)), desc="blocks", initial=first, total=len(blocks)):
            label = f"{lay.blocks}.{i}"
            results, errors = quantize_block(blocks[i], opts, dev, acts, calls[i], label)
            tensors = {
                f"{n}.{k}": v for n, r in results.items() for k, v in r.to_tensors(qcfg).items()
            }
            work.save_block(i, tensors, errors, acts)

    state, errors = assemble(work, original, lay, len(blocks))
    report = ConvertReport(
        output=output,
        source=source,
        architecture=arch_name,
        qcfg=quant_config(opts, provenance(opts, model, arch_name, errors, calib)),
        shapes={n: tuple(original[f"{n}.weight"].shape) for n in names},
        nnz={n: state[f"{n}.{COL_IDX}"].numel() for n in names},
    )
    write_model_dir(staging, state, quantized_config(hf_config, report.qcfg), source)
    shutil.rmtree(work.path)
    publish(staging, output)
    report.seconds = time.perf_counter() - start_time
    return report


def assemble(
    work: WorkDir, original: dict[str, torch.Tensor], lay: Layout, n_blocks: int
) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """Checkpoint tensors (originals with each quantized ``.weight`` replaced) and per-layer errors.

    Always read from the saved block files, resumed run or not: that is what
    makes a resumed checkpoint byte-identical to an uninterrupted one.
    """
    state = dict(original)
    errors: dict[str, float | None] = {}
    for i in range(n_blocks):
        tensors, block_errors = work.load_block(i)
        prefix = f"{lay.blocks}.{i}."
        for name in lay.linears:
            del state[f"{prefix}{name}.weight"]
        state.update({prefix + k: v for k, v in tensors.items()})
        errors.update({prefix + k: v for k, v in block_errors.items()})
    return state, errors
