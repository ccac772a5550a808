"""One decoder block: calibrate each group of linears, solve it, write Ŵ back, advance the activations.

The step between model walking (``converters/walking.py``) and the driver
(``converters/pipeline.py``), GPTQ-style (docs/ALGORITHM.md):

1. forward pre-hooks accumulate the group's statistics Σ = Σ x xᵀ
   (``converters/statistics.py``) on the block with every earlier group already
   quantized (true-sequential; or, with ``true_sequential=False``, all groups on
   the unquantized block); with error propagation a full-precision copy of the
   block, fed the full-precision model's activations, gives the cross terms;
2. every linear of the group is solved (``converters/solvers.py``) and its
   quantized effective weight Ŵ is written back into the block;
3. the block is re-run, so the next block is calibrated on the outputs of the
   *quantized* block, as it will see them at inference.

The block runs on the compute device in float32 (a borrowed copy); activations
stay on the CPU. Each solution is checked before it is written back, and its
relative reconstruction error ‖(W−Ŵ)X‖²/‖WX‖² = tr(DΣDᵀ)/tr(WΣWᵀ) is returned
for the log and the provenance.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from qe_vllm.converters import walking
from qe_vllm.converters.distributed import Ranks
from qe_vllm.converters.objective import LayerStats, layer_error
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.result import QuantResult
from qe_vllm.converters.solvers import solve
from qe_vllm.converters.statistics import FullPrecisionInputs, block_statistics
from qe_vllm.converters.walking import BlockCall, block_linears, borrowed, linear_groups, run_block

log = logging.getLogger(__name__)

FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # largest storable scale or outlier value


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


def solve_cost(lin: torch.nn.Linear) -> float:
    """A linear's solve time, up to a constant: ``out × in²`` (the sweeps' and the Cholesky's order)."""
    return float(lin.out_features * lin.in_features**2)


def solve_linear(
    name: str, w: torch.Tensor, st: LayerStats | None, opts: ConvertOptions, ranks: Ranks
) -> tuple[QuantResult, float | None] | str:
    """One linear's checked solution and its relative error, or why it cannot be stored.

    The refusal travels as a message, so that every process raises it rather
    than waiting for a solution that will never come.
    """
    try:
        res = solve(w, st, opts)
        check_solution(name, res, opts, w)
    except ValueError as e:
        return str(e)
    if ranks.world > 1:
        res = res.cpu()  # what the others receive; the solving process uses the same copy
    return res, None if st is None else layer_error(w, res.weight(opts.group_size).to(w.device), st.sigma)


def quantize_block(
    block: torch.nn.Module,
    opts: ConvertOptions,
    device: torch.device,
    acts: dict[str, torch.Tensor] | None,
    call: BlockCall | None,
    label: str,
    ranks: Ranks = Ranks(),
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
        bar = tqdm(total=sum(map(len, groups)), desc=label, leave=False, disable=not ranks.leader)
        fp = None
        if acts is not None and "hidden_fp" in acts:
            firsts = [g[0] for g in groups]
            width = sum(block.get_submodule(n).in_features for n in firsts)
            fp = FullPrecisionInputs(
                copy.deepcopy(block), acts["hidden_fp"], call, device, firsts,
                cache=fits_in_memory(acts["hidden_fp"][..., 0].numel() * width * 4), ranks=ranks,
            )
        stages = [[g] for g in groups] if opts.true_sequential else [groups]
        for stage in stages:
            stats = {}
            if acts is not None:
                stats = block_statistics(
                    block, [g[0] for g in stage], acts["hidden"], call, device,
                    fp_inputs=fp, label=label, ranks=ranks,
                )
            jobs = {name: stats.get(group[0]) for group in stage for name in group}
            if fp is not None:
                jobs = {name: replace(st, fp_energy=fp.energy[name]) for name, st in jobs.items()}
            owners = dict(zip(jobs, ranks.assign([solve_cost(block.get_submodule(n)) for n in jobs])))
            mine = {
                name: solve_linear(f"{label}.{name}", block.get_submodule(name).weight.detach(), st, opts, ranks)
                for name, st in jobs.items()
                if owners[name] == ranks.rank
            }
            for name in jobs:
                outcome = ranks.share(mine.get(name), owners[name], f"sending the solution of {label}.{name}")
                if isinstance(outcome, str):
                    raise ValueError(outcome)
                res, errors[name] = outcome
                if errors[name] is not None and ranks.leader:
                    log.info("%s.%s: relative reconstruction error %.4e", label, name, errors[name])
                w_hat = res.weight(opts.group_size).to(device)
                block.get_submodule(name)._parameters["weight"] = torch.nn.Parameter(w_hat, requires_grad=False)
                results[name] = res
                bar.update()
        if acts is not None:
            run_block(block, acts["hidden"], call, into=acts["hidden"])
            if fp is not None:
                fp.finish()
        bar.close()
    return results, errors
