"""CPU linear paths of the quantease vLLM method vs vLLM's bf16 GEMM, on SmolLM2 block shapes.

Times one decoder block's four linears (qkv 576->960, o 576->576, gate_up 576->3072,
down 1536->576) per path and token count M, through the code vLLM runs:

* ``bf16``: vLLM's own CPU dispatch for unquantized layers
  (``dispatch_cpu_unquantized_gemm``: oneDNN with a prepacked weight on x86);
* ``int4+csr``: the quantease default on CPU (``QuantEaseLinearMethod`` with
  ``QE_VLLM_KERNEL=auto``): torch's CPU int4 GEMM plus the CSR outlier add;
* ``int4``: the same layers converted without outliers (kernel alone);
* ``cpuwna16``: vLLM's own mixed-precision int4 kernel (``CPUWNA16LinearKernel``, as
  chosen by ``choose_mp_linear_kernel``) on the same layers without outliers, fed the
  compressed-tensors layout: the alternative the default was chosen against;
* ``exact``: ``QE_VLLM_KERNEL=torch``, the dequantize-per-call torch path.

Eager mode by default; ``--compile`` wraps every path in ``torch.compile(fullgraph=True,
dynamic=True)`` with Inductor, as vLLM compiles the model on CPU. One thread (what vLLM's
CPU worker gets on a 2-core machine with the default ``VLLM_CPU_OMP_THREADS_BIND=auto``;
change with ``--threads``). Paths are interleaved
within every repetition so background load hits them alike; medians are reported with
the load average. Layers are random W4 g128 asymmetric (``random_layer`` of the test helpers,
``tests/helpers/layers.py``, loaded by path) with ``--density`` outliers::

    python benchmarks/cpu_linear.py                      # -> results/cpu_linear.{md,json}
    python benchmarks/cpu_linear.py --compile            # -> results/cpu_linear_compiled.*
    python benchmarks/cpu_linear.py --ms 1 16 --reps 5   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
MS = (1, 4, 16, 64, 256)
from layer_helpers import layer_helpers  # noqa: E402 - tests/helpers/layers.py, by path


class _Layer(torch.nn.Module):
    """The attributes ``QuantEaseLinearMethod`` reads from a vLLM linear layer (TP = 1)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.params_dtype = torch.bfloat16
        self.qe_in_features = self.qe_full_in_features = in_features
        self.output_size = out_features
        self.output_partition_sizes = [out_features]


def quantease_layer(k: int, n: int, density: float, kernel: str, seed: int) -> Callable:
    from qe_vllm.format import COL_IDX, ROW_PTR, VALUES, QuantEaseConfig, csr_rows
    from qe_vllm.vllm_method import KERNEL_ENV, QuantEaseLinearMethod, QuantEaseVllmConfig

    tensors, cfg = layer_helpers().random_layer(n, k, 4, 128, False, density, seed=seed)
    method = QuantEaseLinearMethod(QuantEaseVllmConfig(QuantEaseConfig(bits=4, group_size=128)))
    layer = _Layer(k, n)
    canonical = {name: tensors[name] for name in ("qweight", "scales", "qzeros")}
    if ROW_PTR in tensors:
        rows, cols, vals = csr_rows(tensors[ROW_PTR]), tensors[COL_IDX].long(), tensors[VALUES]
    else:
        rows = cols = torch.zeros(0, dtype=torch.int64)
        vals = torch.zeros(0, dtype=torch.float16)
    os.environ[KERNEL_ENV] = kernel
    try:
        method._prepare_torch(layer, canonical, rows, cols, vals)
    finally:
        del os.environ[KERNEL_ENV]
    return lambda x: method.apply(layer, x)


def cpuwna16_layer(k: int, n: int, seed: int) -> Callable:
    """vLLM's MP kernel on the compressed-tensors layout, as it serves a stock checkpoint."""
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.model_executor.parameter import (
        GroupQuantScaleParameter,
        PackedColumnParameter,
        PackedvLLMParameter,
    )
    from vllm.scalar_type import scalar_types

    from qe_vllm.kernels.int4_layout import PACK_FACTOR, to_int4_layout

    tensors, _ = layer_helpers().random_layer(n, k, 4, 128, False, 0.0, seed=seed)
    layout = to_int4_layout(tensors["qweight"], tensors["scales"], tensors["qzeros"], bits=4,
                            group_size=128, in_features=k, scale_dtype=torch.bfloat16)
    config = MPLinearLayerConfig(
        full_weight_shape=(k, n), partition_weight_shape=(k, n), weight_type=scalar_types.uint4,
        act_type=torch.bfloat16, group_size=layout.group_size, zero_points=True,
    )
    kernel_cls = choose_mp_linear_kernel(config)
    layer = torch.nn.Module()
    never = lambda *a, **kw: None  # noqa: E731 - nothing is loaded into these
    layer.weight_packed = PackedvLLMParameter(
        data=layout.weight_packed, input_dim=1, output_dim=0, packed_dim=1,
        packed_factor=PACK_FACTOR, weight_loader=never,
    )
    layer.weight_scale = GroupQuantScaleParameter(
        data=layout.weight_scale, output_dim=0, input_dim=1, weight_loader=never
    )
    layer.weight_zero_point = PackedColumnParameter(
        data=layout.weight_zero_point, output_dim=0, packed_dim=0, packed_factor=PACK_FACTOR,
        weight_loader=never,
    )
    kernel = kernel_cls(config, "weight_packed", "weight_scale", "weight_zero_point")
    kernel.process_weights_after_loading(layer)
    return lambda x: kernel.apply_weights(layer, x)


def bf16_layer(k: int, n: int, seed: int) -> Callable:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    g = torch.Generator().manual_seed(seed)
    layer.weight = torch.nn.Parameter(
        (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16), requires_grad=False
    )
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def init_single_process_vllm() -> None:
    """A TP/PP group of one (file store, no network): vLLM's parameter classes ask for it."""
    import tempfile

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    store = Path(tempfile.mkdtemp(prefix="qe-bench-")) / "store"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{store}",
            backend="gloo",
        )
        initialize_model_parallel(1)


def _own_code(f: Callable) -> Callable:
    """``f`` behind a function with its own code object, hence its own Dynamo cache.

    The layer closures share one code object; compiled as is, every call would run the
    guards of every layer's graph (vLLM compiles one graph per model and drops guards).
    """
    namespace = {"f": f}
    exec("def call(x):\n    return f(x)\n", namespace)  # noqa: S102 - fixed source
    return namespace["call"]


def build(density: float, compile_: bool) -> dict[str, list[tuple[int, Callable]]]:
    paths: dict[str, list[tuple[int, Callable]]] = {
        "bf16": [], "int4+csr": [], "int4": [], "cpuwna16": [], "exact": []
    }
    for seed, (k, n) in enumerate(BLOCK.values()):
        paths["bf16"].append((k, bf16_layer(k, n, seed)))
        paths["int4+csr"].append((k, quantease_layer(k, n, density, "auto", seed)))
        paths["int4"].append((k, quantease_layer(k, n, 0.0, "auto", seed)))
        paths["cpuwna16"].append((k, cpuwna16_layer(k, n, seed)))
        paths["exact"].append((k, quantease_layer(k, n, density, "torch", seed)))
    if compile_:
        paths = {
            p: [(k, torch.compile(_own_code(f), fullgraph=True, dynamic=True)) for k, f in layers]
            for p, layers in paths.items()
        }
    return paths


@torch.no_grad()
def measure(paths: dict, ms: list[int], reps: int, calls: int) -> dict[str, dict[int, float]]:
    """Median milliseconds per block (4 linears) for every path and M."""
    result: dict[str, dict[int, float]] = {p: {} for p in paths}
    for m in ms:
        xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in {k for k, _ in paths["bf16"]}}
        samples: dict[str, list[float]] = {p: [] for p in paths}
        for p, layers in paths.items():  # warm-up (first calls allocate scratch buffers)
            for k, f in layers:
                f(xs[k])
        for _ in range(reps):
            for p, layers in paths.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    for k, f in layers:
                        f(xs[k])
                samples[p].append((time.perf_counter() - t0) / calls * 1e3)
        for p in paths:
            result[p][m] = statistics.median(samples[p])
    return result


def report(result: dict, args: argparse.Namespace, load: tuple[list[float], list[float]]) -> str:
    ms = sorted(next(iter(result.values())))
    lines = [
        "# CPU linear paths: one SmolLM2 decoder block (4 linears), "
        f"{'torch.compile (Inductor)' if args.compile else 'eager'}, {args.threads} thread(s)",
        "",
        f"`python benchmarks/cpu_linear.py {' '.join(args.argv)}` — W4 g128 asymmetric, "
        f"{args.density:.0%} outliers (`int4`: none), {args.reps} interleaved repetitions x "
        f"{args.calls} calls, median. Load average before/after: {load[0]} / {load[1]}.",
        "",
        "| path | " + " | ".join(f"M={m} ms" for m in ms) + " | " + " | ".join(f"M={m} vs bf16" for m in ms) + " |",
        "|---|" + "---|" * (2 * len(ms)),
    ]
    for p, row in result.items():
        lines.append(
            f"| {p} | " + " | ".join(f"{row[m]:.3f}" for m in ms) + " | "
            + " | ".join(f"{row[m] / result['bf16'][m]:.2f}x" for m in ms) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="Inductor-compile every path")
    ap.add_argument("--out", type=Path, help="default: results/cpu_linear[_compiled]")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.out = args.out or RESULTS / ("cpu_linear_compiled" if args.compile else "cpu_linear")
    torch.set_num_threads(args.threads)
    init_single_process_vllm()
    paths = build(args.density, args.compile)
    before = [round(x, 2) for x in os.getloadavg()]
    result = measure(paths, args.ms, args.reps, args.calls)
    after = [round(x, 2) for x in os.getloadavg()]
    text = report(result, args, (before, after))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"ms_per_block": {p: {str(m): t for m, t in r.items()} for p, r in result.items()},
         "loadavg_before": before, "loadavg_after": after, "threads": args.threads,
         "density": args.density, "compiled": args.compile, "torch": torch.__version__},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
