"""Layer-wise conversion of a Hugging Face causal LM into a QuantEase checkpoint.

GPTQ-style sequential calibration (algorithm notes §9): the inputs of block 0
are captured once, then block by block

1. forward hooks accumulate Σ = Σ x xᵀ once per distinct linear input (q/k/v
   share one, gate/up share one), per sample in float32 and summed in float64;
2. every linear is solved against Σ and its quantized effective weight Ŵ is
   written back into the block;
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

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qe_vllm.converters import architectures
from qe_vllm.converters.architectures import Architecture, get_module
from qe_vllm.converters.calibration import calibration_windows
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
from qe_vllm.converters.grid import GridSpec
from qe_vllm.converters.hf_loading import resolve_model
from qe_vllm.converters.result import QuantResult
from qe_vllm.converters.solvers import METHODS, solve
from qe_vllm.format import COL_IDX, OUTLIER_VALUE_DTYPES, QuantEaseConfig

log = logging.getLogger(__name__)

OUTLIER_DTYPE = "float16"
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # largest storable scale or outlier value


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that determines the converted weights (and nothing that does not)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    method: str = "rtn"
    outlier_fraction: float = 0.0
    outlier_structure: str = "unstructured"
    iters: int = 5
    damp: float = 0.01
    cd_damp: float = 0.0
    init: str = "gptq"
    act_order: bool = False
    mse_grid: bool = False
    calib_data: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"

    def quant_config(
        self, arch: Architecture, provenance: dict[str, Any] | None = None
    ) -> QuantEaseConfig:
        return QuantEaseConfig(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            outlier_fraction=self.outlier_fraction,
            outlier_structure=self.outlier_structure,
            outlier_dtype=OUTLIER_DTYPE,
            modules_to_not_convert=list(arch.not_converted),
            provenance=provenance or {},
        )

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"method {self.method!r} is not supported; choose one of {list(METHODS)}"
            )
        if self.calibrated and not self.calib_data:
            raise ValueError(
                f"method {self.method} needs calibration text: pass --calib-data FILE_OR_DATASET"
            )
        if self.calibrated and (self.nsamples < 1 or self.seqlen < 2):
            raise ValueError(
                f"--nsamples {self.nsamples} / --seqlen {self.seqlen}: calibration needs at least "
                "1 sample of at least 2 tokens"
            )
        if self.damp < 0 or self.cd_damp < 0:
            raise ValueError(
                f"--damp {self.damp} / --cd-damp {self.cd_damp}: dampening cannot be negative"
            )
        runs_gptq = self.method == "gptq" or (self.method == "quantease" and self.init == "gptq")
        if self.act_order and not runs_gptq:
            raise ValueError(
                "--act-order orders the columns of a GPTQ pass: use it with --method gptq, "
                "or --method quantease --init gptq"
            )
        if (
            self.method == "rtn"
            and self.outlier_fraction > 0
            and self.outlier_structure != "unstructured"
        ):
            raise ValueError(
                "method rtn keeps unstructured outliers only; use --outlier-structure unstructured"
            )


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


def solve_linear(opts: ConvertOptions, w: torch.Tensor, sigma: torch.Tensor | None) -> QuantResult:
    """Quantize one weight matrix ``[out, in]`` (float32) with the chosen method."""
    return solve(
        opts.method,
        w,
        sigma,
        GridSpec(opts.bits, opts.group_size, opts.sym),
        outlier_fraction=opts.outlier_fraction,
        outlier_structure=opts.outlier_structure,
        iters=opts.iters,
        damp=opts.damp,
        cd_damp=opts.cd_damp,
        init=opts.init,
        act_order=opts.act_order,
        mse_grid=opts.mse_grid,
        seed=opts.seed,
        outlier_dtype=OUTLIER_VALUE_DTYPES[OUTLIER_DTYPE],
    )


def check_solution(name: str, res: QuantResult, opts: ConvertOptions, w: torch.Tensor) -> None:
    """A solver's output must be storable: codes on the grid, finite weights, float16 outliers.

    Checked before the solution is written back into the block, so a solver that
    blew up stops the run naming the layer instead of writing Inf into the
    checkpoint or poisoning the next block's calibration. (Found by
    tests/test_fuzz_solvers.py: near the float16 limit, GPTQ's error compensation
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


class InputCovariance:
    """Running Σ = Σ x xᵀ of one linear input; per-sample products in float32, the sum in float64."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.sigma = torch.zeros(features, features, dtype=torch.float64, device=device)

    def hook(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.sigma += (x.T @ x).double()


# --------------------------------------------------------------------------- running blocks


@contextmanager
def exact_matmul() -> Iterator[None]:
    """TF32 off: Σ and the coordinate-descent products are differences of nearly equal terms."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@contextmanager
def borrowed(modules: Iterable[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Run ``modules`` on ``device`` in float32 using copies; the CPU originals come back untouched.

    Swapping tensors (instead of ``module.to``) keeps the original parameters,
    in their original dtype, for the checkpoint writer, and lets the pipeline
    write quantized weights into the copy without touching the source model.
    """
    saved = []
    for root in modules:
        for m in root.modules():
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    saved.append((store, name, t))
                    copy = t.detach().to(
                        device, torch.float32 if t.is_floating_point() else t.dtype
                    )
                    store[name] = (
                        torch.nn.Parameter(copy, requires_grad=False)
                        if isinstance(t, torch.nn.Parameter)
                        else copy
                    )
    try:
        yield
    finally:
        for store, name, t in saved:
            store[name] = t


class _BlockInputs(Exception):
    """Raised by the catcher once block 0 has seen its input."""


class _Catcher(torch.nn.Module):
    def __init__(self, keep: tuple[str, ...]) -> None:
        super().__init__()
        self.keep = keep
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] = {}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.hidden = hidden_states
        self.kwargs = {k: kwargs.get(k) for k in self.keep}
        raise _BlockInputs


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def capture_block_inputs(
    model: torch.nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Block-0 inputs ``[n, seqlen, hidden]`` (float32, CPU) and the kwargs every block is called with."""
    blocks = get_module(model, arch.blocks)
    first = blocks[0]
    catcher = _Catcher(arch.block_kwargs)
    blocks[0] = catcher
    pre = [m for p in arch.pre_block if (m := get_module(model, p)) is not None]
    acts = None
    try:
        with borrowed(pre, device):
            for j in tqdm(range(windows.shape[0]), desc="capture block-0 inputs", leave=False):
                try:
                    model(input_ids=windows[j : j + 1].to(device), use_cache=False)
                except _BlockInputs:
                    pass
                if acts is None:
                    acts = torch.empty(
                        windows.shape[0], *catcher.hidden.shape[1:], dtype=torch.float32
                    )
                acts[j] = catcher.hidden[0].float().cpu()
    finally:
        blocks[0] = first
    return acts, _to(catcher.kwargs, torch.device("cpu"))


def run_block(
    block: torch.nn.Module,
    acts: torch.Tensor,
    kwargs: dict[str, Any],
    device: torch.device,
    *,
    into: torch.Tensor | None,
) -> None:
    """Feed every sample through ``block``; write the outputs to ``into`` (may be ``acts`` itself)."""
    kw = _to(kwargs, device)
    for j in range(acts.shape[0]):
        y = block(acts[j : j + 1].to(device), **kw)
        if into is not None:
            into[j] = (y[0] if isinstance(y, tuple) else y)[0].float().cpu()


def quantize_block(
    block: torch.nn.Module,
    arch: Architecture,
    opts: ConvertOptions,
    device: torch.device,
    acts: torch.Tensor | None,
    kwargs: dict[str, Any],
    label: str,
) -> tuple[dict[str, QuantResult], dict[str, float | None]]:
    """Solve every linear of one block; with calibration, advance ``acts`` in place to its quantized outputs."""
    results: dict[str, QuantResult] = {}
    errors: dict[str, float | None] = {}
    bar = tqdm(total=len(arch.linears), desc=label, leave=False)
    with borrowed([block], device):
        covs: dict[str, InputCovariance] = {}
        if acts is not None:
            hooks = []
            for group in arch.input_groups:
                lin = get_module(block, group[0])
                covs[group[0]] = InputCovariance(lin.in_features, device)
                hooks.append(lin.register_forward_pre_hook(covs[group[0]].hook))
            try:
                run_block(block, acts, kwargs, device, into=None)
            finally:
                for h in hooks:
                    h.remove()
        for group in arch.input_groups:
            sigma = covs.pop(group[0]).sigma if acts is not None else None
            if sigma is not None and not bool(torch.isfinite(sigma).all()):
                raise ValueError(
                    f"the calibration activations entering {label}.{group[0]} hold NaN or Inf "
                    "(the model overflows float32 on this text); check the model's weights "
                    "(norm scales, embeddings) or calibrate with other --calib-data"
                )
            for name in group:
                lin = get_module(block, name)
                w = lin.weight.detach()
                res = solve_linear(opts, w, sigma)
                check_solution(f"{label}.{name}", res, opts, w)
                w_hat = res.weight(opts.group_size).to(device)
                errors[name] = None if sigma is None else relative_error(w, w_hat, sigma)
                if errors[name] is not None:
                    log.info("%s.%s: relative reconstruction error %.4e", label, name, errors[name])
                lin._parameters["weight"] = torch.nn.Parameter(w_hat, requires_grad=False)
                results[name] = res
                bar.update()
        if acts is not None:
            run_block(block, acts, kwargs, device, into=acts)
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

    def save_kwargs(self, kwargs: dict[str, Any]) -> None:
        tmp = self.path / "block_kwargs.pt.tmp"
        with writing(tmp):
            torch.save(kwargs, tmp)
        os.replace(tmp, self.path / "block_kwargs.pt")

    def load_acts(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Inputs of block ``i`` (saved when block ``i - 1`` finished) and the block kwargs."""
        acts = load_file(str(self._inputs_file(i)))["hidden"]
        return acts, torch.load(self.path / "block_kwargs.pt", weights_only=True)

    def save_block(
        self,
        i: int,
        tensors: dict[str, torch.Tensor],
        errors: dict[str, float | None],
        acts: torch.Tensor | None,
    ) -> None:
        """Block ``i`` done: its tensors, the next block's inputs, the progress marker, cleanup.

        The inputs are named by the block they feed, so a kill between any two
        steps leaves the marker pointing at a block whose inputs are on disk
        (never at block ``i`` with block ``i``'s *outputs* in place of its inputs).
        """
        _save_atomic(self._block_file(i), tensors, {"errors": json.dumps(errors, sort_keys=True)})
        if acts is not None:
            _save_atomic(self._inputs_file(i + 1), {"hidden": acts}, {})
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


def quantized_weights(tensors: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """The weight of every linear the conversion will quantize, by module name."""
    suffixes = tuple(f".{name}.weight" for name in arch.linears)
    return {
        k.removesuffix(".weight"): t
        for k, t in sorted(tensors.items())
        if k.startswith(arch.blocks + ".") and k.endswith(suffixes) and t.dim() == 2
    }


def check_fits(
    opts: ConvertOptions, hf_config: dict[str, Any], weights: dict[str, torch.Tensor]
) -> None:
    """Refuse settings or weights the format cannot honour, before any work.

    A group wider than a layer's rows would silently mean "per channel"; windows
    longer than the model's learned positions (OPT) would fail deep inside the
    first forward pass; a weight beyond the float16 range of scales and outlier
    values would be stored as Inf (found by tests/test_fuzz_solvers.py).
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


def provenance(
    opts: ConvertOptions, model: str, arch_name: str, errors: dict[str, float | None]
) -> dict[str, Any]:
    calib = None
    if opts.calibrated:
        path = Path(opts.calib_data).expanduser()
        data = str(path.resolve()) if path.exists() else opts.calib_data
        calib = {"data": data, "nsamples": opts.nsamples, "seqlen": opts.seqlen}
    return {
        "method": opts.method,
        "source_model": model,
        "architecture": arch_name,
        "calibration": calib,
        "solver": {
            "iters": opts.iters,
            "damp": opts.damp,
            "cd_damp": opts.cd_damp,
            "init": opts.init,
            "act_order": opts.act_order,
        }
        if opts.calibrated
        else {},
        "mse_grid": opts.mse_grid,
        "seed": opts.seed,
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
    arch_name, arch = architectures.lookup(hf_config)
    opts.quant_config(arch)  # validates bits / group size / outliers before any work
    dev = pick_device(device)
    check_output(output, overwrite=overwrite, resume=resume)
    original = read_tensors(source)
    check_finite(original)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if opts.calibrated:  # before the model: bad data fails fast
        tokenizer = AutoTokenizer.from_pretrained(source)
        windows = calibration_windows(
            tokenizer, opts.calib_data, opts.nsamples, opts.seqlen, opts.seed
        )
    check_fits(opts, hf_config, quantized_weights(original, arch))
    net = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    net.eval()
    blocks = get_module(net, arch.blocks)
    names = [f"{arch.blocks}.{i}.{name}" for i in range(len(blocks)) for name in arch.linears]
    if missing := [n for n in names if f"{n}.weight" not in original]:
        raise ValueError(
            f"{source}: no tensor {missing[0]}.weight; its key layout is not {arch_name}'s"
        )
    staging = prepare_partial(output, overwrite=overwrite, resume=resume)
    work = WorkDir(staging / "_work", {"model": str(source), **asdict(opts)})
    first = work.next_block
    qcfg = opts.quant_config(arch)
    acts, kwargs = None, {}
    with torch.no_grad(), exact_matmul():
        if opts.calibrated and first == 0:
            acts, kwargs = capture_block_inputs(net, arch, windows, dev)
            work.save_kwargs(kwargs)
        elif opts.calibrated and first < len(blocks):
            acts, kwargs = work.load_acts(first)
        for i in tqdm(range(first, len(blocks)), desc="blocks", initial=first, total=len(blocks)):
            label = f"{arch.blocks}.{i}"
            results, errors = quantize_block(blocks[i], arch, opts, dev, acts, kwargs, label)
            tensors = {
                f"{n}.{k}": v for n, r in results.items() for k, v in r.to_tensors(qcfg).items()
            }
            work.save_block(i, tensors, errors, acts)

    state, errors = assemble(work, original, arch, len(blocks))
    report = ConvertReport(
        output=output,
        source=source,
        architecture=arch_name,
        qcfg=opts.quant_config(arch, provenance(opts, model, arch_name, errors)),
        shapes={n: tuple(original[f"{n}.weight"].shape) for n in names},
        nnz={n: state[f"{n}.{COL_IDX}"].numel() for n in names},
    )
    write_model_dir(staging, state, quantized_config(hf_config, report.qcfg), source)
    shutil.rmtree(work.path)
    publish(staging, output)
    report.seconds = time.perf_counter() - start_time
    return report


def assemble(
    work: WorkDir, original: dict[str, torch.Tensor], arch: Architecture, n_blocks: int
) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """Checkpoint tensors (originals with each quantized ``.weight`` replaced) and per-layer errors.

    Always read from the saved block files, resumed run or not: that is what
    makes a resumed checkpoint byte-identical to an uninterrupted one.
    """
    state = dict(original)
    errors: dict[str, float | None] = {}
    for i in range(n_blocks):
        tensors, block_errors = work.load_block(i)
        prefix = f"{arch.blocks}.{i}."
        for name in arch.linears:
            del state[f"{prefix}{name}.weight"]
        state.update({prefix + k: v for k, v in tensors.items()})
        errors.update({prefix + k: v for k, v in block_errors.items()})
    return state, errors
