"""Conversion on several processes (``converters/distributed.py``), with gloo on this machine's CPUs.

Oracles: the one-process conversion's bytes (a two-process run must write the
same files), and for the summation order, the same windows split every way.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qe_vllm.converters.distributed import Ranks
from qe_vllm.converters.statistics import Partial, push, total
from tests.helpers.env import OFFLINE_ENV, REPO

# One thread per process in every run: the GEMMs' rounding may depend on the thread count.
ENV = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
BIN = Path(sys.executable).parent


def summed(terms: list[torch.Tensor], cuts: list[int]) -> torch.Tensor:
    """The pairwise total when processes own the runs of ``terms`` between ``cuts``."""
    bounds = [0, *cuts, len(terms)]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        stack: list[Partial] = []
        for j in range(a, b):
            push(stack, Partial(j, 1, [terms[j].clone()]))
        parts.append(stack)
    stack = []
    for part in parts:
        for p in part:
            push(stack, p)
    return total(stack)[0]


def test_pairwise_sums_do_not_depend_on_the_split() -> None:
    g = torch.Generator().manual_seed(0)
    terms = [torch.randn(64, dtype=torch.float64, generator=g) * 10.0 ** torch.randint(-8, 8, (64,), generator=g) for _ in range(13)]
    one = summed(terms, [])
    for cuts in ([6], [1], [3, 9], [4, 8, 12], [1, 2, 3, 5, 7, 11]):
        assert torch.equal(summed(terms, cuts), one), cuts
    # the property is not free: per-process sums added up do differ from the sequential sum
    sequential = sum(terms[1:], terms[0].clone())
    halves = sum(terms[1:6], terms[0].clone()) + sum(terms[7:], terms[6].clone())
    assert not torch.equal(sequential, halves)
    stacked = torch.stack(terms)
    exact = torch.tensor([math.fsum(col.tolist()) for col in stacked.T], dtype=torch.float64)
    assert bool(((one - exact).abs() <= 4 * 2.0**-52 * stacked.abs().sum(0)).all())  # log₂ 13 roundings at most


def test_processes_combine_statistics_bit_for_bit(tmp_path) -> None:
    """Σ and the cross term summed by 1, 2 and 3 gloo processes are the same bits."""
    sums = []
    for n in (1, 2, 3):
        run = subprocess.run(
            [str(BIN / "torchrun"), "--nproc-per-node", str(n), "-m", "tests.helpers.dist_sums", str(tmp_path / f"{n}.pt")],
            capture_output=True, text=True, timeout=120, env=ENV, cwd=REPO,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        sums.append(torch.load(tmp_path / f"{n}.pt"))
    for other in sums[1:]:
        for k in ("sigma", "cross"):
            assert torch.equal(other[k], sums[0][k]), k


def test_shares_and_assignment() -> None:
    shares = [Ranks(r, 3).split(7) for r in range(3)]
    assert [(r.first, s) for r, s in shares] == [(0, slice(0, 2)), (2, slice(2, 4)), (4, slice(4, 7))]
    with pytest.raises(ValueError, match="--nsamples 2 is fewer than the 3 processes"):
        Ranks(0, 3).split(2)
    owners = Ranks(0, 2).assign([1.0, 4.0, 3.0, 3.0, 2.0])
    loads = [sum(c for c, o in zip([1.0, 4.0, 3.0, 3.0, 2.0], owners) if o == r) for r in range(2)]
    assert owners == [0, 0, 1, 1, 0] and loads == [7.0, 6.0]  # largest first, to the least loaded
    assert Ranks().assign([5.0, 1.0]) == [0, 0]


def convert_args(model: Path, data_dir: Path, out: Path) -> list[str]:
    """The default QuantEase (true-sequential, error propagation) on 5 windows: 3 + 2 on two processes."""
    return [
        "--model", str(model), "--output", str(out), "--bits", "3", "--group-size", "64",
        "--calib-data", str(data_dir / "wikitext-2-v1-valid.txt"), "--nsamples", "5",
        "--seqlen", "64", "--device", "cpu", "--dist-timeout", "60",
    ]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "qe_vllm.cli.convert", *args],
        capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO,
    )


def same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


@pytest.fixture(scope="module")
def one_process(tiny_llama, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "ckpt"
    run = subprocess.run(
        [str(BIN / "qe-convert"), *convert_args(tiny_llama, data_dir, out)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_two_processes_write_the_same_bytes(one_process, tiny_llama, data_dir, tmp_path) -> None:
    out = tmp_path / "ckpt"
    run = torchrun(*convert_args(tiny_llama, data_dir, out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("qe-convert: wrote") == 1  # the summary once, from process 0
    same_files(out, one_process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dying_process_stops_the_others_and_resume_finishes(one_process, tiny_llama, data_dir, tmp_path) -> None:
    out = tmp_path / "ckpt"
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.dying_rank", "1", "1", *convert_args(tiny_llama, data_dir, out)],
            env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]
    start = time.monotonic()
    outputs = [p.communicate(timeout=240) for p in procs]
    assert procs[1].returncode == 17
    assert procs[0].returncode == 3, outputs[0][1][-3000:]
    assert time.monotonic() - start < 120  # the dead peer is noticed, well before --dist-timeout runs out twice
    errors = [line for line in outputs[0][1].splitlines() if "error:" in line]
    assert len(errors) == 1, outputs[0][1][-3000:]
    assert errors[0].startswith("qe-convert (process 0 of 2): error: another of the 2 processes stopped while")
    assert errors[0].endswith("rerun the same command with --resume")
    assert not out.exists()

    run = torchrun(*convert_args(tiny_llama, data_dir, out), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    same_files(out, one_process)


def test_resuming_on_another_number_of_processes_is_refused(one_process, tiny_llama, data_dir, tmp_path) -> None:
    out = tmp_path / "ckpt"
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.dying_rank", "1", "1", *convert_args(tiny_llama, data_dir, out)],
            env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for r in range(2)
    ]
    for p in procs:
        p.wait(timeout=240)
    run = subprocess.run(
        [str(BIN / "qe-convert"), *convert_args(tiny_llama, data_dir, out), "--resume"],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert run.returncode == 2
    assert "used different settings (processes)" in run.stderr
