"""Calibration statistics: Σ = Σ x xᵀ of each linear's input, and the error-propagation cross terms.

One accumulator (:class:`InputStatistics`) and one way to read a linear's
input (:func:`recording`: forward pre-hooks), shared by the pipeline
(:func:`block_statistics`) and the tests and benchmarks (:func:`model_sigmas`).

Per-sample products are formed in float32 and summed in float64: ~10⁵–10⁶
tokens with activation outliers of 10²–10³ give sums of 10⁹–10¹⁰, where
float32 sums lose the small eigenvalues the solvers divide by. The float64 sums
are pairwise, in a fixed tree over the windows (:func:`push`), so the bits of Σ
do not depend on how the windows are split between processes.

With error propagation each token's input is read twice, from the block as
quantized so far (``x_q``) and from the full-precision block fed the
full-precision model's activations (``x_fp``), and the pairs give
``Σ x_fp x_qᵀ``; each full-precision linear's output energy ``Σ ||W x_fp||²``
stands in for ``Σ x_fp x_fpᵀ`` (``converters/objective.py``). The
full-precision side never changes while a block is solved, so it is read once
per block (:class:`FullPrecisionInputs`), not once per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qe_vllm.converters.distributed import Ranks
from qe_vllm.converters.objective import LayerStats, exact_matmul
from qe_vllm.converters.walking import BlockCall, block_linears, call_block, run_block


@dataclass
class Partial:
    """Per-window products summed over the windows ``[start, start + size)``.

    ``size`` is a power of two and ``start`` a multiple of it: a node of the
    fixed binary tree over all windows that :func:`push` sums along.
    """

    start: int
    size: int
    sums: list[torch.Tensor]


def push(stack: list[Partial], p: Partial) -> None:
    """Append ``p``, the windows right after ``stack``'s, adding each pair of sibling halves into their parent.

    Pairwise summation in a fixed tree: the sum of two halves is formed when
    both are complete, so the total depends on the windows alone, never on
    which process summed which run of them (``converters/distributed.py``),
    and rounding errors grow with log n instead of n. The stack holds at most
    ⌊log₂ n⌋ + 1 partial sums (the binary digits of the count so far).
    """
    assert not stack or stack[-1].start + stack[-1].size == p.start, "windows pushed out of order"
    while stack and stack[-1].size == p.size and stack[-1].start % (2 * p.size) == 0:
        left = stack.pop()
        for a, b in zip(left.sums, p.sums):
            a += b
        p = Partial(left.start, 2 * p.size, left.sums)
    stack.append(p)


def total(stack: list[Partial]) -> list[torch.Tensor]:
    """The sum of a complete stack, folded from its smallest (last) partial sum up."""
    acc = stack[-1].sums
    for p in reversed(stack[:-1]):
        for a, b in zip(p.sums, acc):
            a += b
        acc = p.sums
    return acc


class InputStatistics:
    """Running sums for one linear input; ``paired`` also keeps the full-precision cross terms."""

    def __init__(self, features: int, device: torch.device, paired: bool = False) -> None:
        self.features, self.device, self.paired = features, device, paired
        self.stack: list[Partial] = []

    def add(self, j: int, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add window ``j``'s tokens ``x`` ``[tokens, features]`` (and the same tokens' full-precision inputs)."""
        x = x.float()
        sums = [(x.T @ x).double()]
        if self.paired:
            sums.append((x_fp.float().T @ x).double())
        push(self.stack, Partial(j, 1, sums))

    def result(self, where: str, ranks: Ranks = Ranks()) -> LayerStats:
        """The statistics over every process's windows, refused if they hold NaN or Inf (naming ``where``)."""
        stack = self.stack
        if ranks.world > 1:
            stack = []
            mine = [Partial(p.start, p.size, [t.cpu() for t in p.sums]) for p in self.stack]
            for part in ranks.gather(mine, f"summing the statistics of {where}"):
                for p in part:
                    push(stack, Partial(p.start, p.size, [t.to(self.device) for t in p.sums]))
        sums = total(stack)
        for t in sums:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"the calibration activations entering {where} hold NaN or Inf (the model "
                    "overflows float32 on this text); check the model's weights (norm scales, "
                    "embeddings) or calibrate with other --calib-data"
                )
        return LayerStats(*sums)


class _Captured(Exception):
    """Every requested input is in: the rest of the forward pass is not needed."""


@contextmanager
def hooked(
    root: torch.nn.Module, names: Sequence[str], hook: Callable[[str], Callable[..., None]], *, pre: bool
) -> Iterator[None]:
    """``hook(name)`` on each submodule ``names`` of ``root`` (a forward pre-hook with ``pre``), removed after."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(root.get_submodule(n), register)(hook(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recording(
    root: torch.nn.Module, names: Sequence[str], *, stop: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of each submodule ``names`` of ``root`` as ``[tokens, features]``.

    The dict is overwritten by every forward pass. With ``stop``, the pass is
    cut short (:class:`_Captured`, caught by :func:`linear_inputs`) as soon as
    every input is in.
    """
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0].reshape(-1, args[0].shape[-1])
            if stop and len(seen) == len(names):
                raise _Captured

        return record

    with hooked(root, names, hook, pre=True):
        yield seen


def _read(seen: dict[str, torch.Tensor], names: Sequence[str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The inputs ``seen`` records of ``names`` while ``run()`` runs (a :func:`recording` with ``stop``)."""
    seen.clear()
    try:
        run()
    except _Captured:
        pass
    missing = [n for n in names if n not in seen]
    if missing:
        raise RuntimeError(f"the forward pass never called {missing}")
    return dict(seen)


def linear_inputs(
    block: torch.nn.Module, names: Sequence[str], x: torch.Tensor, call: BlockCall
) -> dict[str, torch.Tensor]:
    """The inputs of ``names`` when ``block`` runs on ``x``, stopping once all are read."""
    with recording(block, names, stop=True) as seen:
        return _read(seen, names, lambda: call_block(block, x, call))


def model_sigmas(
    model: torch.nn.Module, names: Sequence[str], windows: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Σ (float64) of the input of each submodule ``names`` of the unquantized causal LM ``model``.

    Over the token windows ``windows`` ``[n, seqlen]``, one per forward pass,
    accumulated as the pipeline accumulates it (:class:`InputStatistics`), each
    pass cut short once every input is read. For the tests and benchmarks that
    need real statistics of real layers without running a conversion.
    """
    device = next(model.parameters()).device
    stats = {n: InputStatistics(model.get_submodule(n).in_features, device) for n in names}
    with torch.no_grad(), exact_matmul(), recording(model, names, stop=True) as seen:
        for j, window in enumerate(windows):
            x = _read(seen, names, lambda: model(input_ids=window[None].to(device), use_cache=False))
            for n in names:
                stats[n].add(j, x[n])
    return {n: s.result(n).sigma for n, s in stats.items()}


@contextmanager
def output_energy(root: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[float]]]:
    """``||y||²`` of the output of each submodule ``names`` of ``root``, one entry per forward pass.

    Each pass's sum is formed in float32; the caller adds them in float64, in window order.
    """
    energy: dict[str, list[float]] = {n: [] for n in names}

    def hook(name: str):
        def add(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            energy[name].append(float(out.float().square().sum()))

        return add

    with hooked(root, names, hook, pre=False):
        yield energy


class FullPrecisionInputs:
    """The full-precision block's side of the error-propagation statistics.

    Per sample, the inputs of the linears ``names`` (for the cross terms), and
    per linear of the block, its output energy :attr:`energy` (for the
    constant, ``converters/objective.py``). The full-precision block is never
    quantized, so neither changes between true-sequential stages. One full pass
    per sample reads every energy; with ``cache`` the same pass records the
    inputs of all ``names`` (on the CPU) and moves ``acts`` on to the block's
    outputs: one pass of the block instead of a partial pass per stage plus a
    full one, measured as about a fifth of the calibration time of a SmolLM2
    block (benchmarks/results/conversion_time.md). Without it (the inputs would
    not fit in memory), each stage re-reads its own with a partial pass and
    :meth:`finish` moves ``acts`` on. Both give the same tensors bit for bit:
    the same operations on the same inputs. With several processes, ``acts``
    are this process's windows and :attr:`energy` sums everyone's, in window order.
    """

    def __init__(
        self,
        block: torch.nn.Module,
        acts: torch.Tensor,
        call: BlockCall,
        device: torch.device,
        names: Sequence[str],
        *,
        cache: bool,
        ranks: Ranks = Ranks(),
    ) -> None:
        self.block, self.acts, self.call, self.device = block, acts, call, device
        self.cached: list[dict[str, torch.Tensor]] | None = [] if cache else None
        linears = block_linears(block)
        with recording(block, names if cache else ()) as seen, output_energy(block, linears) as energy:
            for j in range(acts.shape[0]):
                y = call_block(block, acts[j : j + 1].to(device), call)
                if self.cached is not None:
                    # copied before acts[j] is overwritten: an input may be a view of it
                    self.cached.append({n: seen[n].to("cpu", copy=True) for n in names})
                    acts[j] = y[0].float().cpu()
        parts = ranks.gather(energy, "summing the full-precision output energies")
        self.energy: dict[str, float] = {n: sum(e for part in parts for e in part[n]) for n in linears}

    def __call__(self, j: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Sample ``j``'s inputs of ``names`` ``[tokens, features]``, on the compute device."""
        if self.cached is not None:
            return {n: self.cached[j][n].to(self.device) for n in names}
        return linear_inputs(self.block, names, self.acts[j : j + 1].to(self.device), self.call)

    def finish(self) -> None:
        """Move ``acts`` on to the block's outputs (done already when cached)."""
        if self.cached is None:
            run_block(self.block, self.acts, self.call, into=self.acts)


def block_statistics(
    block: torch.nn.Module,
    names: Sequence[str],
    acts: torch.Tensor,
    call: BlockCall,
    device: torch.device,
    *,
    fp_inputs: FullPrecisionInputs | None = None,
    label: str = "block",
    ranks: Ranks = Ranks(),
) -> dict[str, LayerStats]:
    """Statistics of the inputs of ``names`` over every sample ``acts[j]`` fed to ``block``.

    With ``fp_inputs`` (the same samples' inputs in the full-precision model),
    the cross terms too. With several processes, ``acts`` are this process's
    windows (the first is window ``ranks.first``) and the result sums everyone's.
    """
    stats = {
        n: InputStatistics(block.get_submodule(n).in_features, device, fp_inputs is not None)
        for n in names
    }
    for j in range(acts.shape[0]):
        xq = linear_inputs(block, names, acts[j : j + 1].to(device), call)
        xf = None if fp_inputs is None else fp_inputs(j, names)
        for n in names:
            stats[n].add(ranks.first + j, xq[n], None if xf is None else xf[n])
    return {n: s.result(f"{label}.{n}", ranks) for n, s in stats.items()}
