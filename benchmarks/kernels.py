"""QuantEase kernels vs fp16 cuBLAS on Llama-3-8B linear shapes, plus an end-to-end decode check.

Needs torch, triton and transformers only (no vLLM). On a GPU::

    python benchmarks/kernels.py                 # sweep + e2e -> results/kernels.{md,json,png}
    python benchmarks/kernels.py --tune          # first tune configs per (shape, variant, M); slow
    python benchmarks/kernels.py --shapes down --ms 1 16 --no-e2e   # a slice

Kernel times are medians over CUDA-event timings after warm-up; M <= 64 is timed inside a
CUDA graph of ``--graph-calls`` back-to-back calls (decode is launch-bound otherwise);
weights rotate through enough copies to exceed twice the L2 cache, so nothing is timed
from L2. Bandwidth is (weights + x + y bytes) / time, compared with a measured
device-to-device copy. Layers are random, asymmetric: ``random_layer`` of the test helpers
(``tests/helpers/layers.py``, loaded by path: run from a checkout of the repository).

On a CPU, ``--smoke`` runs tiny shapes through the Triton interpreter only to prove the
script executes: its timings say nothing about GPU speed, and the results file says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (K = in_features, N = out_features)
    "qo": (4096, 4096),
    "qkv": (4096, 6144),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
SMOKE_SHAPES = {"smoke": (256, 192)}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
SMOKE_MS = (1, 4, 32, 1024)
GRAPH_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    bits: int
    group_size: int
    density: float


VARIANTS = (
    Variant("W4 g128", 4, 128, 0.0),
    Variant("W3 g128", 3, 128, 0.0),
    Variant("W3 g128 +1%", 3, 128, 0.01),
    Variant("W2 g64 +2%", 2, 64, 0.02),
)
E2E_VARIANTS = ("W4 g128", "W3 g128 +1%")


# --------------------------------------------------------------------------- timing


class Timer:
    """Median microseconds of a thunk: CUDA events (optionally in a CUDA graph) or wall clock."""

    def __init__(self, device: torch.device, reps: int, graph_calls: int) -> None:
        self.device, self.reps, self.graph_calls = device, reps, graph_calls

    def __call__(self, fns: list[Callable[[], object]], graph: bool) -> float:
        """Time calls cycling through ``fns`` (one per weight copy)."""
        for fn in fns:  # warm-up: compiles kernels, fills allocator caches
            fn()
        if self.device.type != "cuda":
            samples = []
            for i in range(max(3, self.reps // 10)):
                t0 = time.perf_counter()
                fns[i % len(fns)]()
                samples.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(samples)
        calls = self.graph_calls if graph else len(fns)

        def run_all() -> None:
            for i in range(calls):
                fns[i % len(fns)]()

        run = run_all
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run_all()
            torch.cuda.current_stream().wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                run_all()
            run = cuda_graph.replay
        run()
        torch.cuda.synchronize()
        samples = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(samples)


def copy_bandwidth(device: torch.device, timer: Timer) -> float | None:
    """GB/s of a 1 GiB device-to-device copy (read + write bytes): the achievable bandwidth."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = timer([lambda: dst.copy_(src)], graph=False)
    return 2 * src.numel() / us / 1e3


def copies_to_defeat_l2(nbytes: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(32, math.ceil(2 * l2 / nbytes)))


# --------------------------------------------------------------------------- kernel sweep

from layer_helpers import layer_helpers  # noqa: E402 - tests/helpers/layers.py, by path


def build_layer(variant: Variant, k: int, n: int, device: torch.device, seed: int):
    from qe_vllm.kernels.layout import pack_weights

    tensors, cfg = layer_helpers().random_layer(
        n,
        k,
        variant.bits,
        variant.group_size,
        sym=False,
        density=variant.density,
        seed=seed,
        hot_block=None,
        empty_row_every=None,
        device=device,
    )
    return tensors, cfg, pack_weights(tensors, cfg, k)


def clone_weights(w):
    return dataclasses.replace(
        w,
        **{
            f.name: getattr(w, f.name).clone()
            for f in dataclasses.fields(w)
            if isinstance(getattr(w, f.name), torch.Tensor)
        },
    )


def sweep(args: argparse.Namespace, device: torch.device, timer: Timer) -> list[dict]:
    from qe_vllm.kernels import dispatch
    from qe_vllm.kernels.ops import quantease_linear
    from qe_vllm.kernels.reference import reference_linear

    error_bound = layer_helpers().error_bound

    dtype = torch.float16
    rows = []
    for shape in args.shapes:
        k, n = (SMOKE_SHAPES if args.smoke else SHAPES)[shape]
        dense = [torch.randn(n, k, dtype=dtype, device=device) * 0.02]
        dense += [dense[0].clone() for _ in range(copies_to_defeat_l2(dense[0].nbytes, device) - 1)]
        baseline = {}
        for m in args.ms:
            x = torch.randn(m, k, dtype=dtype, device=device)
            baseline[m] = timer(
                [lambda wd=wd, x=x: torch.nn.functional.linear(x, wd) for wd in dense],
                graph=m <= GRAPH_MAX_M,
            )
        del dense
        for vi, variant in enumerate(v for v in VARIANTS if v.name in args.variants):
            tensors, cfg, w = build_layer(variant, k, n, device, seed=vi)
            x_check = torch.randn(4, k, dtype=dtype, device=device)
            y_ref = reference_linear(x_check, tensors, cfg, k)
            err = (quantease_linear(x_check, w).float() - y_ref).abs()
            check = float((err / error_bound(x_check, tensors, cfg, k, y_ref)).max())
            del tensors, y_ref, err
            weights = [w] + [
                clone_weights(w) for _ in range(copies_to_defeat_l2(w.nbytes(), device) - 1)
            ]
            for m in args.ms:
                x = torch.randn(m, k, dtype=dtype, device=device)
                if args.tune:
                    dispatch.tune(x, w)
                config = dispatch.get_config(m, w, device)
                us = timer(
                    [lambda wq=wq, x=x: quantease_linear(x, wq) for wq in weights],
                    graph=m <= GRAPH_MAX_M,
                )
                nbytes = w.nbytes() + 2 * m * (k + n)
                rows.append(
                    {
                        "shape": shape,
                        "K": k,
                        "N": n,
                        "M": m,
                        "variant": variant.name,
                        "fp16_us": baseline[m],
                        "ours_us": us,
                        "speedup": baseline[m] / us,
                        "fp16_GBps": (2 * n * k + 2 * m * (k + n)) / baseline[m] / 1e3,
                        "ours_GBps": nbytes / us / 1e3,
                        "bits_per_weight": 8 * w.nbytes() / (n * k),
                        "config": dataclasses.asdict(config),
                        "err_over_bound_M4": check,
                    }
                )
                print(
                    f"{shape:8s} {variant.name:12s} M={m:5d}  fp16 {baseline[m]:9.1f} us"
                    f"  ours {us:9.1f} us"
                    f"  x{baseline[m] / us:5.2f}  [{config.kind}]",
                    flush=True,
                )
            del weights, w
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- end to end


def e2e(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Greedy decode tokens/s of a random Llama-architecture model: fp16 vs our linears."""
    from qe_vllm.kernels.layout import QuantEaseWeights
    from qe_vllm.kernels.ops import quantease_linear
    from transformers import LlamaConfig, LlamaForCausalLM

    class QuantEaseLinear(torch.nn.Module):
        def __init__(self, w: QuantEaseWeights) -> None:
            super().__init__()
            self.w = w

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return quantease_linear(x, self.w)

    if args.smoke:
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=256,
            max_position_embeddings=128,
        )
    else:  # Llama-3-8B dimensions; --e2e-layers trims depth to fit time or memory
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_hidden_layers=args.e2e_layers,
            vocab_size=128256,
            max_position_embeddings=8192,
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16).eval()
    names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    originals = {
        (i, name): layer.get_submodule(name)
        for i, layer in enumerate(model.model.layers)
        for name in names
    }

    def set_linears(make: Callable[[torch.nn.Linear, int], torch.nn.Module]) -> None:
        for seed, ((i, name), lin) in enumerate(originals.items()):
            parent, _, attr = name.rpartition(".")
            setattr(model.model.layers[i].get_submodule(parent), attr, make(lin, seed))

    def tokens_per_s(batch: int) -> float:
        prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device=device)

        def generate(new: int) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        generate(2)  # warm-up: kernel compilation
        decode_s = generate(args.tokens) - generate(1)  # prefill and the first token cancel out
        return batch * (args.tokens - 1) / decode_s

    rows = []
    for batch in args.batches:
        rows.append({"model": "fp16", "batch": batch, "tokens_per_s": tokens_per_s(batch)})
    for variant in (v for v in VARIANTS if v.name in E2E_VARIANTS):
        set_linears(
            lambda lin, seed, variant=variant: QuantEaseLinear(
                build_layer(variant, lin.in_features, lin.out_features, device, seed)[2]
            )
        )
        for batch in args.batches:
            rows.append(
                {"model": variant.name, "batch": batch, "tokens_per_s": tokens_per_s(batch)}
            )
        set_linears(lambda lin, seed: lin)
    for row in rows:
        print(
            f"e2e {row['model']:12s} batch {row['batch']:3d}: {row['tokens_per_s']:10.1f} tokens/s",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"


def write_report(meta: dict, rows: list[dict], e2e_rows: list[dict], smoke: bool) -> list[Path]:
    stem = "kernels_smoke" if smoke else "kernels"
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    json_path.write_text(
        json.dumps({"meta": meta, "kernels": rows, "e2e": e2e_rows}, indent=1) + "\n"
    )
    lines = [f"# QuantEase kernel benchmark{' (smoke run)' if smoke else ''}", ""]
    if smoke:
        lines += [
            (
                "**GPU numbers: UNMEASURED.** This is a `--smoke` run on a CPU through the Triton "
                "interpreter, only proving that `benchmarks/kernels.py` executes end to end. Its "
                "timings measure numpy, not any GPU, and must not be read as kernel performance."
            ),
            "",
        ]
    lines += [
        f"- device: **{meta['device']}**",
        f"- torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}",
        f"- configs: {meta['configs']}",
        f"- copy bandwidth (device-to-device, read+write): {meta['copy_GBps'] or 'n/a'} GB/s",
        f"- command: `{meta['command']}`",
        "",
    ]
    lines += [
        "## Linear layers (fp16 activations; us = median microseconds)",
        "",
        (
            "| shape | M | variant | b/w | fp16 us | ours us | speedup | ours GB/s "
            "| % of copy BW | kernel | err/bound |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = f"{100 * r['ours_GBps'] / meta['copy_GBps']:.0f}" if meta["copy_GBps"] else "n/a"
        lines.append(
            f"| {r['shape']} {r['K']}->{r['N']} | {r['M']} | {r['variant']} "
            f"| {r['bits_per_weight']:.2f} | {r['fp16_us']:.1f} | {r['ours_us']:.1f} "
            f"| {r['speedup']:.2f} | {r['ours_GBps']:.0f} | {pct} | "
            f"{r['config']['kind']} | {r['err_over_bound_M4']:.3f} |"
        )
    if e2e_rows:
        lines += [
            "",
            f"## End-to-end greedy decode ({meta['e2e']})",
            "",
            "| model | batch | tokens/s |",
            "|---|---|---|",
        ]
        lines += [f"| {r['model']} | {r['batch']} | {r['tokens_per_s']:.1f} |" for r in e2e_rows]
    md_path.write_text("\n".join(lines) + "\n")
    written = [json_path, md_path]
    if smoke and not _has_gpu_results(RESULTS / "kernels.json"):
        (RESULTS / "kernels.md").write_text(
            "# QuantEase kernel benchmark\n\n**GPU numbers: UNMEASURED.** No GPU run of "
            "`benchmarks/kernels.py` has been recorded yet; run `python benchmarks/kernels.py` "
            "on a GPU machine to fill this file. Only a CPU smoke run exists "
            "([kernels_smoke.md](kernels_smoke.md)), which proves the script runs and measures "
            "no GPU.\n"
        )
        written.append(RESULTS / "kernels.md")
    if not smoke:
        written += plot(rows, RESULTS / "kernels_speedup.png")
    return written


def _has_gpu_results(path: Path) -> bool:
    return path.exists() and not json.loads(path.read_text())["meta"].get("smoke", True)


def plot(rows: list[dict], path: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(
        1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False, sharey=True
    )
    for ax, shape in zip(axes[0], shapes):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["shape"] == shape and r["variant"] == variant]
            ax.plot([r["M"] for r in sel], [r["speedup"] for r in sel], marker="o", label=variant)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="M (tokens)", title=f"{shape} {sel[0]['K']}->{sel[0]['N']}")
    axes[0][0].set_ylabel("speedup vs fp16 cuBLAS")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU: tiny shapes through the Triton interpreter"
    )
    parser.add_argument("--shapes", nargs="+", help=f"subset of {list(SHAPES)}")
    parser.add_argument("--ms", nargs="+", type=int, help=f"token counts (default {MS})")
    parser.add_argument("--variants", nargs="+", help="subset of " + ", ".join(repr(v.name) for v in VARIANTS).replace("%", "%%"))
    parser.add_argument(
        "--tune", action="store_true", help="tune a config per (shape, variant, M) first"
    )
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--graph-calls", type=int, default=20)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--e2e-layers", type=int, default=32)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per e2e generation")
    parser.add_argument("--prompt-len", type=int, default=16)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke:
            parser.error("no GPU: only --smoke runs on a CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    if args.smoke:
        args.shapes = args.shapes or list(SMOKE_SHAPES)
        args.ms = args.ms or list(SMOKE_MS)
        args.tokens = min(args.tokens, 4)
        args.reps = min(args.reps, 3)
    args.shapes = args.shapes or list(SHAPES)
    args.ms = args.ms or list(MS)
    args.variants = args.variants or [v.name for v in VARIANTS]

    import transformers
    import triton
    from qe_vllm.kernels import dispatch

    timer = Timer(device, args.reps, args.graph_calls)
    meta = {
        "device": device_name(device),
        "smoke": args.smoke,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(["python"] + sys.argv),
        "configs": "tuned per (M bucket, shape, variant) with --tune"
        if args.tune
        else f"default heuristics ({os.environ.get(dispatch.CONFIG_ENV) or 'no config file'})",
        "copy_GBps": None,
        "e2e": "random Llama-architecture model, transformers generate (eager, dynamic cache), "
        f"{'tiny smoke config' if args.smoke else f'Llama-3-8B dims, {args.e2e_layers} layers'}, "
        f"prompt {args.prompt_len}, {args.tokens} new tokens, decode-only rate",
    }
    copy = copy_bandwidth(device, timer)
    meta["copy_GBps"] = round(copy, 1) if copy else None
    rows = sweep(args, device, timer)
    e2e_rows = [] if args.no_e2e else e2e(args, device)
    if args.tune:
        dispatch.save_configs(
            RESULTS / f"kernels_configs_{device_name(device).replace(' ', '_')}.json"
        )
    for path in write_report(meta, rows, e2e_rows, args.smoke):
        print("wrote", path)


if __name__ == "__main__":
    main()
