"""Calibration statistics: Σ = Σ x xᵀ of each linear's input, and the error-propagation cross terms.

One accumulator (:class:`InputStatistics`) and one way to read a linear's
input (:func:`linear_inputs`: forward pre-hooks), shared by the pipeline, the
tests and the benchmarks.

Per-sample products are formed in float32 and summed in float64: ~10⁵–10⁶
tokens with activation outliers of 10²–10³ give sums of 10⁹–10¹⁰, where
float32 sums lose the small eigenvalues the solvers divide by.

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

import torch

from qe_vllm.converters.objective import LayerStats
from qe_vllm.converters.walking import BlockCall, block_linears, call_block, run_block


class InputStatistics:
    """Running sums for one linear input; ``paired`` also keeps the full-precision cross terms."""

    def __init__(self, features: int, device: torch.device, paired: bool = False) -> None:
        def zeros() -> torch.Tensor:
            return torch.zeros(features, features, dtype=torch.float64, device=device)

        self.sigma = zeros()
        self.cross = zeros() if paired else None

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add tokens ``x`` ``[tokens, features]`` (and the same tokens' full-precision inputs)."""
        x = x.float()
        self.sigma += (x.T @ x).double()
        if self.cross is not None:
            self.cross += (x_fp.float().T @ x).double()

    def result(self, where: str) -> LayerStats:
        """The statistics, refused if they hold NaN or Inf (naming ``where``)."""
        for t in (self.sigma, self.cross):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"the calibration activations entering {where} hold NaN or Inf (the model "
                    "overflows float32 on this text); check the model's weights (norm scales, "
                    "embeddings) or calibrate with other --calib-data"
                )
        return LayerStats(self.sigma, self.cross)


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


def linear_inputs(
    block: torch.nn.Module, names: Sequence[str], x: torch.Tensor, call: BlockCall
) -> dict[str, torch.Tensor]:
    """The inputs of ``names`` when ``block`` runs on ``x``, stopping once all are read."""
    with recording(block, names, stop=True) as seen:
        try:
            call_block(block, x, call)
        except _Captured:
            pass
        missing = [n for n in names if n not in seen]
        if missing:
            raise RuntimeError(f"the block never called {missing}")
        return dict(seen)


@contextmanager
def output_energy(root: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, float]]:
    """``Σ ||y||²`` of the output of each submodule ``names`` of ``root``, over every forward pass.

    Each pass's sum is formed in float32 and added in float64, like Σ's products.
    """
    energy = dict.fromkeys(names, 0.0)

    def hook(name: str):
        def add(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            energy[name] += float(out.float().square().sum())

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
    the same operations on the same inputs.
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
        self.energy: dict[str, float] = energy

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
) -> dict[str, LayerStats]:
    """Statistics of the inputs of ``names`` over every sample ``acts[j]`` fed to ``block``.

    With ``fp_inputs`` (the same samples' inputs in the full-precision model),
    the cross terms too.
    """
    stats = {
        n: InputStatistics(block.get_submodule(n).in_features, device, fp_inputs is not None)
        for n in names
    }
    for j in range(acts.shape[0]):
        xq = linear_inputs(block, names, acts[j : j + 1].to(device), call)
        xf = None if fp_inputs is None else fp_inputs(j, names)
        for n in names:
            stats[n].add(xq[n], None if xf is None else xf[n])
    return {n: s.result(f"{label}.{n}") for n, s in stats.items()}
