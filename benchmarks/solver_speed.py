"""Time one lazy-block QuantEase sweep against one GPTQ pass on SmolLM2-sized layers.

    python benchmarks/solver_speed.py [--repeats 5] [--bits 3] [--device cpu] [--threads 1 2]

Prints a table and writes ``benchmarks/results/solver_speed.json``. Weights and
``sigma`` are random (``sigma`` correlated: low rank plus noise, a few loud
channels); only the shapes matter for speed. A sweep is what each QuantEase
iteration costs: the per-sweep GEMM (``gradient``) plus the column loop; the
GPTQ pass includes its Cholesky factorisation. Times are the best of
``--repeats`` runs: on a shared machine the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from qe_vllm.converters.gptq import gptq
from qe_vllm.converters.grid import dequantize, fit_grid
from qe_vllm.converters.objective import Quadratic, exact_matmul
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.quantease import CoordinateDescent

SHAPES = [(576, 1536), (1536, 576)]  # [out, in]: SmolLM2-135M down_proj-like and up/gate-like
RESULTS = Path(__file__).parent / "results" / "solver_speed.json"


def random_layer(
    out_f: int, in_f: int, device: str, n_tokens: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(in_f, 64, generator=g) @ torch.randn(64, n_tokens, generator=g)
    x += 0.3 * torch.randn(in_f, n_tokens, generator=g)
    x[:8] *= 10
    w = 0.02 * torch.randn(out_f, in_f, generator=g)
    return w.to(device), (x @ x.T).to(device)


def seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs (after one warm-up)."""
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def textbook_gptq(bits: int) -> ConvertOptions:
    """Plain GPTQ options: per-channel grid, layer-wise target, default damping."""
    return ConvertOptions(
        method="gptq", bits=bits, group_size=-1, true_sequential=False, propagation=0.0,
        shrink=0.0, cd_damp=0.0,
    )


@exact_matmul()
def measure(
    out_f: int, in_f: int, opts: ConvertOptions, repeats: int, device: str
) -> dict[str, float | int]:
    w, sigma = random_layer(out_f, in_f, device)
    spec = opts.spec
    grid = fit_grid(w, spec)
    start = gptq(w, sigma, opts, grid=grid)
    w_hat = dequantize(start.codes, start.scales, start.zeros, spec.group_size)
    cd = CoordinateDescent(w, Quadratic.of(sigma), spec, grid)

    def sweep() -> torch.Tensor:
        g, _ = cd.gradient(w_hat)
        return cd.sweep(w_hat, g)

    t_gptq = seconds(lambda: gptq(w, sigma, opts, grid=grid), repeats, device)
    t_sweep = seconds(sweep, repeats, device)
    t_setup = seconds(lambda: CoordinateDescent(w, Quadratic.of(sigma), spec, grid), repeats, device)
    return {
        "threads": torch.get_num_threads(),
        "out_features": out_f,
        "in_features": in_f,
        "gptq_pass_s": t_gptq,
        "quantease_sweep_s": t_sweep,
        "quantease_setup_s": t_setup,
        "sweep_over_gptq": t_sweep / t_gptq,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    args = ap.parse_args()
    opts = textbook_gptq(args.bits)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows += [measure(o, i, opts, args.repeats, args.device) for o, i in SHAPES]

    header = ("threads", "layer [out x in]", "GPTQ pass", "QE sweep", "QE setup", "sweep/GPTQ")
    print("{:>7} {:>18} {:>10} {:>10} {:>10} {:>11}".format(*header))
    for r in rows:
        print(
            f"{r['threads']:>7} {r['out_features']:>8} x {r['in_features']:<7}"
            f" {r['gptq_pass_s']:>9.3f}s {r['quantease_sweep_s']:>9.3f}s"
            f" {r['quantease_setup_s']:>9.3f}s {r['sweep_over_gptq']:>11.2f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "device": args.device,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "bits": args.bits,
        "group_size": opts.group_size,
        "block_size": 128,
        "repeats": args.repeats,
    }
    RESULTS.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
