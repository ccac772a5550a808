"""Start ``vllm serve`` on a QuantEase checkpoint with flags chosen for CPU or GPU.

::

    python serving/launch.py CKPT                        # auto-detect the device
    python serving/launch.py CKPT --device cpu --eager   # fast start-up (tests, development)
    python serving/launch.py CKPT --device gpu --tp 2 -- --max-num-seqs 64
    python serving/launch.py CKPT --dry-run              # print the command, start nothing

Anything after ``--`` goes to ``vllm serve`` unchanged (and wins over the flags below).
The server binds to ``--host`` (default 127.0.0.1: loopback only).

Why these flags
---------------
Both devices:

* ``--quantization quantease``: vLLM would detect the method from ``config.json`` anyway;
  naming it turns "this directory is not a QuantEase checkpoint" into a start-up error
  instead of silently serving something else.
* ``--max-model-len``: KV memory is reserved for it per sequence; the model's 8k default
  wastes memory on small machines.

CPU:

* ``--dtype bfloat16``: bf16 GEMMs use AVX512-BF16/AMX where present (vLLM's default on
  CPU too); float32 doubles activation and KV-cache memory and runs slower.
* ``VLLM_CPU_KVCACHE_SPACE`` (GiB): without it vLLM sizes the KV cache from total RAM
  and takes most of it; set it to what ``max-num-seqs x max-model-len`` needs.
* ``VLLM_CPU_OMP_THREADS_BIND``: ``auto`` (TP=1) pins the worker's OpenMP threads to one
  NUMA node and keeps a core for the API server and engine loop. With tensor
  parallelism on a single NUMA node ``auto`` fails, so the cores are split explicitly,
  one ``|``-separated range per rank.
* torch.compile (default) vs ``--eager``: vLLM compiles the model with Dynamo + Inductor,
  which fuses the element-wise work around the linears (norms, activations, the
  outlier add) and is faster in steady state, but the first start spends 1-3 minutes
  compiling C++ (cached afterwards under ``~/.cache/vllm/torch_compile_cache``).
  ``--eager`` (``--enforce-eager``) starts in seconds: use it for tests and development.

GPU:

* ``--dtype``: bfloat16 on compute capability >= 8.0, float16 below (no bf16 there); the
  QuantEase Triton kernels take either.
* ``--gpu-memory-utilization`` (default 0.90): the fraction of GPU memory vLLM may use for
  weights, activations and KV cache; lower it when the GPU is shared.
* CUDA graphs stay on (no ``--enforce-eager``): decode steps are launch-bound and the
  QuantEase op is a registered custom op with a fake implementation and no host
  synchronisation, so it is captured like vLLM's own kernels. ``--eager`` is for
  debugging only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

try:
    from serving.server import HOST, vllm_launcher
except ImportError:  # run as `python serving/launch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from serving.server import HOST, vllm_launcher

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def detect_device() -> str:
    """"gpu" when torch sees a CUDA device, else "cpu"."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def cpu_thread_bind(tp: int, cpus: int | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND``: ``auto`` at TP=1, else one core range per rank."""
    if tp == 1:
        return "auto"
    cpus = cpus or os.cpu_count() or tp
    per_rank = cpus // tp
    if per_rank < 1:
        raise ValueError(f"tensor parallel size {tp} needs at least {tp} CPU cores, found {cpus}")
    ranges = [(r * per_rank, (r + 1) * per_rank - 1) for r in range(tp)]
    return "|".join(f"{a}-{b}" if b > a else str(a) for a, b in ranges)


def gpu_dtype() -> str:
    """bfloat16 from compute capability 8.0 (Ampere) on, float16 below."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device gpu, but torch sees no CUDA device (pass --dtype to skip the check)")
    major, _ = torch.cuda.get_device_capability()
    return "bfloat16" if major >= 8 else "float16"


def serve_args(
    device: str,
    *,
    tp: int = 1,
    eager: bool = False,
    max_model_len: int = 2048,
    kv_cache_gib: float = 2.0,
    gpu_memory_utilization: float = 0.90,
    dtype: str | None = None,
    quantized: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` arguments (after the model) and environment for ``device``.

    ``quantized=False`` gives the same flags for an original checkpoint (baselines).
    """
    args = ["--quantization", "quantease"] if quantized else []
    args += ["--max-model-len", str(max_model_len)]
    env = dict(OFFLINE_ENV)
    if tp > 1:
        args += ["--tensor-parallel-size", str(tp)]
    if eager:
        args.append("--enforce-eager")
    if device == "cpu":
        args += ["--dtype", dtype or "bfloat16"]
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_bind(tp)
    elif device == "gpu":
        args += ["--dtype", dtype or gpu_dtype(),
                 "--gpu-memory-utilization", f"{gpu_memory_utilization:g}"]
    else:
        raise ValueError(f"device {device!r}; choose cpu or gpu")
    return args, env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python serving/launch.py",
        description="Start `vllm serve` on a QuantEase checkpoint with device-appropriate flags.",
        usage="python serving/launch.py MODEL [options] [-- extra vllm serve arguments]",
        epilog=__doc__.split("Why these flags")[0].split("::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("model", help="QuantEase checkpoint directory (written by qe-convert)")
    a("--device", choices=("auto", "cpu", "gpu"), default="auto")
    a("--host", default=HOST, help="bind address (default %(default)s: loopback only)")
    a("--port", type=int, default=8000)
    a("--served-model-name", help="name clients use (default: the directory name)")
    a("--tp", type=int, default=1, help="tensor-parallel size")
    a("--eager", action="store_true", help="no torch.compile / CUDA graphs (fast start-up)")
    a("--max-model-len", type=int, default=2048)
    a("--kv-cache-gib", type=float, default=2.0, help="CPU only: KV cache size")
    a("--gpu-memory-utilization", type=float, default=0.90, help="GPU only")
    a("--dtype", help="override the activation dtype chosen for the device")
    a("--dry-run", action="store_true", help="print the command and environment, start nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    a = build_parser().parse_args(argv[:split])
    extra = argv[split + 1 :]  # passed to `vllm serve` unchanged
    model = Path(a.model).expanduser().resolve()
    if not (model / "config.json").is_file():
        print(f"launch: error: {model} has no config.json", file=sys.stderr)
        return 2
    device = detect_device() if a.device == "auto" else a.device
    try:
        args, env = serve_args(
            device, tp=a.tp, eager=a.eager, max_model_len=a.max_model_len,
            kv_cache_gib=a.kv_cache_gib, gpu_memory_utilization=a.gpu_memory_utilization,
            dtype=a.dtype,
        )
    except ValueError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    env = {**env, **{k: os.environ[k] for k in env if k in os.environ}}  # the caller's env wins
    launcher = vllm_launcher()
    model_part = [str(model)] if launcher[-1] == "serve" else ["--model", str(model)]
    argv_out = [*launcher, *model_part, "--host", a.host, "--port", str(a.port),
                "--served-model-name", a.served_model_name or model.name, *args, *extra]
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv_out),
          flush=True)
    if a.dry_run:
        return 0
    os.execvpe(argv_out[0], argv_out, {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
