"""Kernel choice per call: M bucket and shape -> ``KernelConfig``, with a tunable cache.

Three regimes: ``gemv`` (CUDA-core split-K, tiny M), ``gemm`` (tensor-core
tiles, split-K while the M x N grid alone cannot fill the GPU) and ``dequant`` (scratch +
cuBLAS, prefill). The cache is keyed by ``(M bucket, N, K, bits, group_size)``; entries come
from, in order, :func:`set_config`/:func:`tune`, a JSON file named by ``$QE_KERNEL_CONFIGS``,
or :func:`default_config`. Lookups never benchmark, so the op stays CUDA-graph capturable:
tune before capture (e.g. with ``benchmarks/kernels.py --tune``) and ship the JSON.

This module imports Triton only inside :func:`launch` and :func:`tune`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from .layout import QuantEaseWeights

Kind = Literal["gemv", "gemm", "dequant"]
ConfigKey = tuple[int, int, int, int, int]

GEMV_MAX_M = 4
"""Largest M sent to the CUDA-core kernel by default: its FMAs grow with M, tensor cores' do not."""
DEQUANT_MIN_M = 1024
"""Smallest M the default sends to dequantize + cuBLAS (a guess until measured per shape)."""
MAX_M_BUCKET = 4096
CONFIG_ENV = "QE_KERNEL_CONFIGS"


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel variant (``block_m``/``split_k`` unused by ``dequant``)."""

    kind: Kind
    block_m: int = 16
    block_n: int = 128
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


_configs: dict[ConfigKey, KernelConfig] = {}
_env_loaded = False


def interpreter_enabled() -> bool:
    """Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def triton_usable(x: torch.Tensor) -> bool:
    """The Triton kernels can run on ``x``: fp16/bf16 on CUDA, fp16 on CPU under the interpreter.

    The interpreter's bf16 arithmetic is wrong, so bf16 on CPU takes the torch fallback even
    with ``TRITON_INTERPRET=1`` set (a test process may export it for every child).
    """
    if x.is_cuda:
        dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    elif interpreter_enabled():
        dtypes = (torch.float16,)
    else:
        return False
    if x.dtype not in dtypes:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def m_bucket(m: int) -> int:
    """Next power of two of ``m`` (capped): configs are shared within a bucket."""
    return min(1 << max(m - 1, 0).bit_length(), MAX_M_BUCKET)


def config_key(m: int, w: QuantEaseWeights) -> ConfigKey:
    return (m_bucket(m), w.out_features, w.in_features, w.bits, w.group_size)


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; 1 under the interpreter so it launches few programs."""
    if device.type == "cuda" and not interpreter_enabled():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _splits_to_fill(programs_mn: int, k: int, quantum: int, target_programs: int) -> int:
    """K splits so ``programs_mn * splits`` reaches ``target_programs`` (<= one per quantum)."""
    return max(1, min(target_programs // max(programs_mn, 1), -(-k // quantum)))


def default_config(m: int, w: QuantEaseWeights, num_sms: int) -> KernelConfig:
    """Untuned starting point per regime, after gemlite's H100 configs, within our constraints.

    ``block_n`` is a multiple of the outlier ``tile_n``; ``block_k`` stays within one group
    when it can (one scale row per step); split-K targets a few waves of programs.
    """
    n, k = w.out_features, w.in_features
    block_n = max(128 if n < 8192 else 256, w.tile_n)
    if m >= DEQUANT_MIN_M:
        return KernelConfig("dequant", block_k=min(32, w.tile_k), num_warps=4)
    if m <= GEMV_MAX_M:
        block_m = m_bucket(m)
        block_k = max(16, min(w.group_width, 2048 // (block_m * block_n)))
        programs = -(-n // block_n)
        split = _splits_to_fill(programs, k, max(block_k, w.tile_k), 4 * num_sms)
        return KernelConfig("gemv", block_m, block_n, block_k, split, num_warps=4, num_stages=2)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 128 else 128
    block_k = max(16, min(64, w.group_width))
    programs = -(-m // block_m) * -(-n // block_n)
    split = _splits_to_fill(programs, k, max(block_k, w.tile_k), 2 * num_sms) if m <= 64 else 1
    return KernelConfig(
        "gemm", block_m, block_n, block_k, split, num_warps=8 if block_m >= 128 else 4, num_stages=3
    )


def get_config(m: int, w: QuantEaseWeights, device: torch.device) -> KernelConfig:
    """The cached config for this call, creating the default on a miss."""
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        if os.environ.get(CONFIG_ENV):
            load_configs(os.environ[CONFIG_ENV])
    key = config_key(m, w)
    if key not in _configs:
        _configs[key] = default_config(m, w, _num_sms(device))
    return _configs[key]


def set_config(key: ConfigKey, cfg: KernelConfig) -> None:
    _configs[key] = cfg


def clear_configs() -> None:
    _configs.clear()


def save_configs(path: str | Path) -> None:
    """Write the cache as JSON (one file per GPU model; loaded through ``$QE_KERNEL_CONFIGS``)."""
    rows = [{"key": list(key), "config": asdict(cfg)} for key, cfg in sorted(_configs.items())]
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")


def load_configs(path: str | Path) -> None:
    for row in json.loads(Path(path).read_text()):
        key = tuple(int(v) for v in row["key"])
        _configs[key] = KernelConfig(**row["config"])  # type: ignore[index]


def launch(
    x: torch.Tensor, w: QuantEaseWeights, cfg: KernelConfig, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Run one configured kernel: ``x [M, K]`` -> ``[M, N]`` in ``x.dtype`` (into ``out``)."""
    if cfg.kind == "dequant":
        from .triton_dequant import dequant_matmul

        return dequant_matmul(x, w, block_k=cfg.block_k, num_warps=cfg.num_warps, out=out)
    from .triton_matmul import fused_matmul

    return fused_matmul(
        x,
        w,
        block_m=cfg.block_m,
        block_n=cfg.block_n,
        block_k=cfg.block_k,
        split_k=cfg.split_k,
        use_dot=cfg.kind == "gemm",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        out=out,
    )


def candidate_configs(m: int, w: QuantEaseWeights) -> list[KernelConfig]:
    """Search space for :func:`tune`: each regime that can serve this M, a few dozen tiles each."""
    block_ns = sorted({max(b, w.tile_n) for b in (128, 256, 512)})
    cands: list[KernelConfig] = []
    if m <= 16:
        for bn in block_ns:
            for bk in (16, 32, 64):
                cands += [
                    KernelConfig("gemv", m_bucket(m), bn, bk, split, 4, 2)
                    for split in (4, 8, 16, 32)
                ]
    block_ms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * m_bucket(m))][-2:]
    splits = (1, 4, 8, 16) if m <= 64 else (1,)
    for bm in block_ms:
        for bn in block_ns[:2]:
            for bk in (32, 64):
                for split in splits:
                    warps = 8 if bm * bn >= 128 * 128 else 4
                    cands += [
                        KernelConfig("gemm", bm, bn, bk, split, warps, stages) for stages in (2, 3)
                    ]
    if m >= 256:
        cands += [
            KernelConfig("dequant", block_k=bk, num_warps=nw) for bk in (16, 32) for nw in (4, 8)
        ]
    return cands


def tune(
    x: torch.Tensor,
    w: QuantEaseWeights,
    candidates: list[KernelConfig] | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> KernelConfig:
    """Time every candidate on ``x`` (GPU), cache and return the fastest; failing ones are skipped.

    ``timer`` maps a thunk to milliseconds (default ``triton.testing.do_bench``).
    """
    if interpreter_enabled() or not x.is_cuda:
        raise RuntimeError("tuning needs a GPU (the interpreter would time numpy)")
    import triton.testing

    timer = timer or (lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20))
    out = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    best: tuple[float, KernelConfig] | None = None
    for cfg in candidates or candidate_configs(x.shape[0], w):
        try:
            ms = timer(lambda cfg=cfg: launch(x, w, cfg, out))
        # any failure of one candidate (compiler error, out of shared memory) only drops it
        except Exception:  # noqa: BLE001, S112
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best is None:
        raise RuntimeError("no candidate config ran")
    set_config(config_key(x.shape[0], w), best[1])
    return best[1]
