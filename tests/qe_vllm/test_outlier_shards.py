"""Tensor-parallel outlier assembly against dense slicing (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from qe_vllm.format import COL_IDX, ROW_PTR, VALUES, csr_from_dense
from qe_vllm.outlier_shards import RowSlice, assemble_outliers


def _sparse(out_f: int, in_f: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out_f, in_f, generator=g) < density
    keep[0] = False  # a row without outliers
    return torch.randn(out_f, in_f, generator=g).half().float() * keep


def _to_dense(rows, cols, vals, out_f, in_f) -> torch.Tensor:
    d = torch.zeros(out_f, in_f)
    d.index_put_((rows, cols), vals.float(), accumulate=True)
    return d


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_qkv_column_parallel_with_replicated_kv(tp_rank: int) -> None:
    """Fused q/k/v at TP=2 with one KV head replicated on both ranks."""
    in_f, q_rows, kv_rows = 40, 16, 4  # 2 q heads of 8, 1 kv head of 4 (replicated)
    shards = {s: _sparse(n, in_f, 0.2, i) for i, (s, n) in enumerate([("q", q_rows), ("k", kv_rows), ("v", kv_rows)])}
    stash = {s: csr_from_dense(w, torch.float16) for s, w in shards.items()}
    q_pp = q_rows // 2
    plan = [
        RowSlice("q", tp_rank * q_pp, q_pp, 0),
        RowSlice("k", 0, kv_rows, q_pp),
        RowSlice("v", 0, kv_rows, q_pp + kv_rows),
    ]
    got = _to_dense(*assemble_outliers("qkv", stash, plan, in_f), q_pp + 2 * kv_rows, in_f)
    want = torch.cat([shards["q"][tp_rank * q_pp : (tp_rank + 1) * q_pp], shards["k"], shards["v"]])
    assert torch.equal(got, want)


@pytest.mark.parametrize("tp_rank", [0, 1, 2])
def test_row_parallel_keeps_and_rebases_this_ranks_columns(tp_rank: int) -> None:
    out_f, in_f, tp = 12, 48, 3
    w = _sparse(out_f, in_f, 0.3, 7)
    in_pp = in_f // tp
    plan = [RowSlice(None, 0, out_f, 0)]
    got = assemble_outliers("down", {None: csr_from_dense(w, torch.float16)}, plan, in_f, tp_rank * in_pp, in_pp)
    assert torch.equal(_to_dense(*got, out_f, in_pp), w[:, tp_rank * in_pp : (tp_rank + 1) * in_pp])


def test_dummy_load_has_no_outliers() -> None:
    rows, cols, vals = assemble_outliers("x", {}, [RowSlice(None, 0, 4, 0)], 8)
    assert rows.numel() == cols.numel() == vals.numel() == 0


def test_missing_shard_names_the_layer() -> None:
    stash = {"q": csr_from_dense(_sparse(4, 8, 0.5, 1), torch.float16)}
    with pytest.raises(ValueError, match="qkv_proj.*shard k.*outlier_row_ptr"):
        assemble_outliers("model.layers.0.qkv_proj", stash, [RowSlice("q", 0, 4, 0), RowSlice("k", 0, 4, 4)], 8)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t: t[COL_IDX].fill_(99), "out of range"),
        (lambda t: t[ROW_PTR].__setitem__(-1, 1), "end at nnz"),
        (lambda t: t[VALUES].fill_(float("nan")), "NaN"),
    ],
)
def test_corrupt_csr_is_refused(corrupt, message: str) -> None:
    csr = csr_from_dense(_sparse(6, 10, 0.5, 3), torch.float16)
    corrupt(csr)
    with pytest.raises(ValueError, match=message):
        assemble_outliers("o_proj", {None: csr}, [RowSlice(None, 0, 6, 0)], 10)
