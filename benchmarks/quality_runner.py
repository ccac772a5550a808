"""Running the quality benchmark: one (setting, seed) at a time, each stored as one JSON file.

A quantized setting converts SmolLM2 with the project's own pipeline
(``qe_vllm.converters.pipeline.convert``, what ``qe-convert`` runs) into a
scratch directory, evaluates the checkpoint *on disk* with
``qe_vllm.cli.eval.evaluate`` (what ``qe-eval`` runs), reads the per-layer
relative errors from the provenance and the effective bits/weight from the
stored tensors, then deletes the checkpoint.

Resumable: a finished (setting, seed) is one file under ``RESULTS/quality/``
and is skipped on a re-run; a conversion interrupted mid-way resumes from its
last finished block, and a finished conversion whose evaluation was interrupted
is evaluated again without converting. Peer rows are never run here.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import platform
import re
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quality_protocol import (
    EVAL_FILE,
    EVAL_SEQLEN,
    IN_DOMAIN,
    PEER_DIR,
    TEXTBOOK_GPTQ,
    TIMING_SEED,
    Protocol,
    Setting,
    calib_source,
)

log = logging.getLogger("quality")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the result store


class ResultStore:
    """Per-(setting, seed) result files under one results directory.

    ``quality/STEM.json`` for this script's rows (``STEM.failed.json`` for a
    failed attempt), ``peer/STEM.json`` for the peer's.
    """

    def __init__(self, results: Path) -> None:
        self.results = results
        self.quality = results / "quality"

    def folder(self, s: Setting) -> Path:
        return self.results / PEER_DIR if s.peer else self.quality

    def path(self, s: Setting, proto: Protocol, seed: int | None) -> Path:
        return self.folder(s) / f"{s.stem(proto, seed)}.json"

    def failed_path(self, s: Setting, proto: Protocol, seed: int | None) -> Path:
        return self.folder(s) / f"{s.stem(proto, seed)}.failed.json"

    def done(self, s: Setting, proto: Protocol, seed: int | None) -> bool:
        return self.path(s, proto, None if not s.seeded else seed).is_file()

    def seeds(self, s: Setting, proto: Protocol) -> list[int | None]:
        """The seeds stored for ``s`` under ``proto`` (``[None]`` for a stored unseeded setting)."""
        if not s.seeded:
            return [None] if self.path(s, proto, None).is_file() else []
        head, tail = s.stem(proto, "*").split("*")
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\.json")
        found = (pattern.fullmatch(p.name) for p in self.folder(s).glob(f"{head}*{tail}.json"))
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, s: Setting, proto: Protocol) -> list[dict[str, Any]]:
        """Every stored result of ``s`` under ``proto``, by increasing seed."""
        return [json.loads(self.path(s, proto, seed).read_text()) for seed in self.seeds(s, proto)]

    def failure(self, s: Setting, proto: Protocol) -> str | None:
        """The error of a stored failed attempt of ``s`` (any seed), if any."""
        head, _, tail = s.stem(proto, "*").partition("*")
        files = sorted(
            self.folder(s).glob(f"{head}*{tail}.failed.json" if s.seeded else f"{head}.failed.json")
        )
        return json.loads(files[0].read_text()).get("error", "?") if files else None

    def save(self, s: Setting, proto: Protocol, seed: int | None, result: dict[str, Any]) -> None:
        write_json(self.path(s, proto, seed), result)
        self.failed_path(s, proto, seed).unlink(missing_ok=True)

    def save_failure(self, s: Setting, proto: Protocol, seed: int | None, error: str) -> None:
        write_json(self.failed_path(s, proto, seed), {"key": s.key, "seed": seed, "error": error})

    def unused(self, used: set[Path]) -> list[Path]:
        """Result files under ``quality/`` that no planned (setting, seed) reads."""
        files = sorted(self.quality.glob("*.json")) if self.quality.is_dir() else []
        return [f for f in files if f not in used and not f.name.endswith(".failed.json")]


# ----------------------------------------------------------------------------- running one setting


@dataclass
class RunConfig:
    model: Path
    data: Path
    scratch: Path
    device: str
    proto: Protocol
    store: ResultStore
    timing_repeats: int = 3
    command: str = ""


def machine() -> dict[str, Any]:
    import torch

    from qe_vllm.machine import cpu_model

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def checkpoint_stats(out: Path) -> dict[str, Any]:
    """Effective bits/weight (all stored bytes of the quantized linears) and provenance errors."""
    from qe_vllm.converters.checkpoint import read_quantized
    from qe_vllm.format import COL_IDX, ROW_PTR, VALUES

    ckpt = read_quantized(out)
    weights = sum(o * i for o, i in ckpt.shapes.values())
    total = outlier = nnz = 0
    for tensors in ckpt.layers.values():
        for name, t in tensors.items():
            b = t.numel() * t.element_size()
            total += b
            if name in (ROW_PTR, COL_IDX, VALUES):
                outlier += b
            if name == VALUES:
                nnz += t.numel()
    errors = {
        k: v for k, v in ckpt.qcfg.provenance.get("relative_error", {}).items() if v is not None
    }
    vals = list(errors.values())
    by_kind: dict[str, list[float]] = {}
    for k, v in errors.items():
        by_kind.setdefault(k.rsplit(".", 1)[-1], []).append(v)
    return {
        "linears": len(ckpt.layers),
        "quantized_weights": weights,
        "outliers_stored": nnz,
        "effective_bits_per_weight": 8 * total / weights,
        "outlier_bits_per_weight": 8 * outlier / weights,
        "grid_bits_per_weight": 8 * (total - outlier) / weights,
        "rel_error_mean": statistics.fmean(vals) if vals else None,
        "rel_error_median": statistics.median(vals) if vals else None,
        "rel_error_max": max(vals) if vals else None,
        "rel_error_mean_by_kind": {k: statistics.fmean(v) for k, v in sorted(by_kind.items())},
        "rel_error_per_layer": errors,
        "provenance": {k: v for k, v in ckpt.qcfg.provenance.items() if k != "relative_error"},
    }


def run_eval(model_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    from qe_vllm.cli.eval import evaluate

    test = cfg.data / EVAL_FILE
    return evaluate(
        str(model_dir), str(test), EVAL_SEQLEN, cfg.proto.windows, "float32", cfg.device
    )


def run_reference(s: Setting, seed: int | None, cfg: RunConfig) -> dict[str, Any]:
    ev = run_eval(cfg.model, cfg)
    return {"ppl": ev["ppl"], "eval": ev, "eval_seconds": ev["seconds"]}


def convert_once(s: Setting, seed: int | None, cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Convert into ``out`` (resuming a partial conversion); reuse a finished one."""
    from qe_vllm.converters.checkpoint import partial_dir
    from qe_vllm.converters.pipeline import convert

    done_marker = out.with_name(out.name + ".convert.json")
    if out.is_dir() and done_marker.is_file():  # converted, but evaluation was interrupted
        log.info("  reusing the converted checkpoint at %s", out)
        return json.loads(done_marker.read_text())
    calib_data, calib_files = (None, [])
    if s.calibrated:
        calib_data, calib_files = calib_source(s.calib, cfg.data, cfg.scratch)
    opts = s.options(calib_data, cfg.proto, seed or 0)
    if out.exists():
        shutil.rmtree(out)
    resume = partial_dir(out).exists()
    if resume:
        log.info("  resuming the interrupted conversion at %s", partial_dir(out))
    t0 = time.perf_counter()
    report = convert(str(cfg.model), out, opts, device=cfg.device, resume=resume)
    conv = {
        "convert_seconds": time.perf_counter() - t0,
        "convert_resumed": resume,
        "convert_device": cfg.device,
        "options": asdict(opts),
        "options_tag": s.tag(),
        "calibration_files": calib_files,
        **checkpoint_stats(report.output),
    }
    write_json(done_marker, conv)
    return conv


def run_quantized(s: Setting, seed: int | None, cfg: RunConfig) -> dict[str, Any]:
    out = cfg.scratch / s.stem(cfg.proto, seed)
    conv = convert_once(s, seed, cfg, out)
    ev = run_eval(out, cfg)
    shutil.rmtree(out)
    out.with_name(out.name + ".convert.json").unlink(missing_ok=True)
    return {"ppl": ev["ppl"], "eval": ev, "eval_seconds": ev["seconds"], **conv}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # one warm-up
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def timing_stats(cfg: RunConfig, block: int, names: tuple[str, ...]):
    """Block ``block`` of the unquantized model, and its linears' input Σ (float64)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qe_vllm.converters.calibration import calibration_windows
    from qe_vllm.converters.statistics import model_sigmas

    calib_data, calib_files = calib_source(IN_DOMAIN, cfg.data, cfg.scratch)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    n = cfg.proto.timing_nsamples
    windows = calibration_windows(tok, calib_data, n, cfg.proto.seqlen, TIMING_SEED)
    net = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    sigmas = model_sigmas(net, [f"model.layers.{block}.{n}" for n in names], windows)
    return net.model.layers[block], {n: sigmas[f"model.layers.{block}.{n}"] for n in names}, calib_files


def time_layer(name: str, w, sigma, repeats: int) -> dict[str, Any]:
    """One lazy-block QuantEase sweep vs one GPTQ pass on ``w`` (3-bit g128, textbook solvers)."""
    import torch

    from qe_vllm.converters.gptq import gptq
    from qe_vllm.converters.grid import dequantize, fit_grid
    from qe_vllm.converters.objective import Quadratic, layer_error
    from qe_vllm.converters.options import ConvertOptions
    from qe_vllm.converters.quantease import CoordinateDescent, quantease

    textbook = {"bits": 3, "group_size": 128, "sym": False, **TEXTBOOK_GPTQ}
    gptq_opts = ConvertOptions(method="gptq", **textbook)
    qe_opts = ConvertOptions(method="quantease", **textbook)
    spec = gptq_opts.spec
    grid = fit_grid(w, spec)
    start = gptq(w, sigma, gptq_opts, grid=grid)
    w_hat = dequantize(start.codes, start.scales, start.zeros, spec.group_size)
    cd = CoordinateDescent(w, Quadratic.of(sigma), spec, grid)

    def sweep() -> torch.Tensor:
        g, _ = cd.gradient(w_hat)
        return cd.sweep(w_hat, g)

    t_gptq = best_time(lambda: gptq(w, sigma, gptq_opts, grid=grid), repeats)
    t_sweep = best_time(sweep, repeats)
    t_setup = best_time(lambda: CoordinateDescent(w, Quadratic.of(sigma), spec, grid), repeats)
    t0 = time.perf_counter()
    qe = quantease(w, Quadratic.of(sigma), qe_opts)
    t_qe = time.perf_counter() - t0
    one = sweep()
    return {
        "layer": name,
        "out_features": w.shape[0],
        "in_features": w.shape[1],
        "gptq_pass_s": t_gptq,
        "quantease_sweep_s": t_sweep,
        "quantease_setup_s": t_setup,
        "sweep_over_gptq": t_sweep / t_gptq,
        "quantease_full_solve_s": t_qe,
        "quantease_full_over_gptq": t_qe / t_gptq,
        "quantease_iters": qe_opts.iters,
        "rel_error_gptq": layer_error(w, w_hat, sigma),
        "rel_error_gptq_plus_1_sweep": layer_error(w, one, sigma),
        "rel_error_quantease": layer_error(w, qe.weight(spec.group_size), sigma),
    }


def run_sweep_timing(s: Setting, seed: int | None, cfg: RunConfig) -> dict[str, Any]:
    """One lazy-block QuantEase sweep vs one GPTQ pass, real layers, real Σ (3-bit g128)."""
    import torch

    from qe_vllm.converters.objective import exact_matmul

    block, names = 5, ("self_attn.q_proj", "mlp.down_proj")
    layer, sigmas, calib_files = timing_stats(cfg, block, names)
    rows = []
    with torch.no_grad(), exact_matmul():
        for n in names:
            w = layer.get_submodule(n).weight.detach().float().clone()
            # float64 Σ, as the pipeline hands it to the solvers
            rows.append(time_layer(f"model.layers.{block}.{n}", w, sigmas[n], cfg.timing_repeats))
            log.info(
                "  %s: GPTQ pass %.3fs, QE sweep %.3fs (%.2fx)",
                rows[-1]["layer"],
                rows[-1]["gptq_pass_s"],
                rows[-1]["quantease_sweep_s"],
                rows[-1]["sweep_over_gptq"],
            )
    return {
        "bits": 3,
        "group_size": 128,
        "block_size": 128,
        "calibration": {
            "files": calib_files,
            "nsamples": cfg.proto.timing_nsamples,
            "seqlen": cfg.proto.seqlen,
            "seed": TIMING_SEED,
        },
        "repeats": cfg.timing_repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


RUNNERS = {"reference": run_reference, "sweep-timing": run_sweep_timing}


def run_setting(s: Setting, seed: int | None, cfg: RunConfig) -> dict[str, Any]:
    """Run ``s`` at ``seed`` (``None`` for an unseeded setting): the result file's content."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    body = RUNNERS.get(s.method, run_quantized)(s, seed, cfg)
    return {
        "key": s.key,
        "tier": s.tier,
        "method": s.method,
        "bits": s.bits if s.quantized else None,
        "group_size": s.group_size if s.quantized else None,
        "outlier_fraction": s.outlier_fraction,
        "outlier_structure": s.outlier_structure,
        "calib": s.calib,
        "seed": seed,
        "protocol": s.protocol(cfg.proto, seed),
        **body,
        "wall_seconds": time.perf_counter() - t0,
        "load_average_1min": {"start": load0, "end": os.getloadavg()[0]},
        "machine": machine(),
        "command": cfg.command,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ----------------------------------------------------------------------------- the run loop


def selected(s: Setting, only: list[str] | None) -> bool:
    """``--only``: any pattern matches the key (fnmatch) or is a substring of it."""
    return not only or any(fnmatch.fnmatchcase(s.key, p) or p in s.key for p in only)


def pending(
    rows: list[Setting],
    seeds: list[int],
    store: ResultStore,
    proto: Protocol,
    only: list[str] | None,
) -> Iterator[tuple[Setting, int | None]]:
    """(setting, seed) pairs still to run, seed-major: every setting at one seed before the next seed."""
    queued: set[tuple[str, int | None]] = set()
    for seed in seeds:
        for s in rows:
            item = (s.key, seed if s.seeded else None)
            if s.peer or not selected(s, only) or item in queued or store.done(s, proto, item[1]):
                continue
            queued.add(item)
            yield s, item[1]


def run_all(
    rows: list[Setting],
    seeds: list[int],
    cfg: RunConfig,
    only: list[str] | None,
    max_minutes: float | None,
    after_each: Callable[[], None],
) -> None:
    """Run what is pending; a failure is recorded and the run goes on; ``after_each`` after each."""
    todo = list(pending(rows, seeds, cfg.store, cfg.proto, only))
    log.info(
        "%d runs to do (%s)",
        len(todo),
        ", ".join(s.key + ("" if seed is None else f"@s{seed}") for s, seed in todo),
    )
    start = time.perf_counter()
    for s, seed in todo:
        elapsed = (time.perf_counter() - start) / 60
        if max_minutes is not None and elapsed >= max_minutes:
            log.info("stopping: %.1f min elapsed >= --max-minutes %g", elapsed, max_minutes)
            break
        label = f"[{s.tier}] {s.key}" + (f" seed {seed}" if seed is not None else "")
        log.info("%s: start (%.1f min elapsed)", label, elapsed)
        try:
            result = run_setting(s, seed, cfg)
        except Exception as e:  # noqa: BLE001 - record, go on with the next run
            traceback.print_exc()
            cfg.store.save_failure(s, cfg.proto, seed, f"{type(e).__name__}: {e}")
            log.info("%s: FAILED (%s)", label, e)
            continue
        cfg.store.save(s, cfg.proto, seed, result)
        ppl = f", ppl {result['ppl']:.3f}" if "ppl" in result else ""
        log.info("%s: done in %.0f s%s", label, result["wall_seconds"], ppl)
        after_each()
