"""``qe-eval --tasks``: accuracy through lm-evaluation-harness, checked against an oracle.

The task is ``tests/data/lm_eval_tasks/qe_easy_facts`` (18 sentence completions, 4 choices,
data shipped as .jsonl: no network). The oracle below recomputes its accuracy from
per-choice log-likelihoods taken directly from transformers, without lm-eval: the sum of
the log-probabilities of the continuation ``" " + choice`` given the question, argmax
against the gold index (``acc``), and the same divided by the choice's length in
characters (``acc_norm``, lm-eval's definition). A scoring bug on either side (wrong
token split, a dropped or extra token, gold index off by one, normalization) changes which
choice wins on some item and so, almost always, the count of correct answers: the two must
agree exactly.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers.env import SMOLLM2_DIR, TESTS, run_script
from qe_vllm.cli import eval as cli
from qe_vllm.converters.hf_loading import load_model

try:
    import lm_eval  # noqa: F401
except ImportError:
    pytest.fail("lm-eval is not installed: `bash serving/setup.sh` installs .[eval]", pytrace=False)

TASKS_DIR = TESTS / "data" / "lm_eval_tasks"
TASK = "qe_easy_facts"
DOCS = [json.loads(line) for line in (TASKS_DIR / f"{TASK}.jsonl").read_text().splitlines()]
# Largest change of one choice's log-likelihood between float32 (local) and vLLM's bf16 CPU
# path, measured on this task for each item's two leading choices: 0.46 nats ("A triangle
# has three" -> "legs"; 0.83 for a far-off distractor). An answer can only flip between the
# two when its margin is below twice that.
DRIFT_NATS = 0.5


def _qe_eval_tasks(model: Path | str, out: Path, *extra: str) -> dict:
    r = run_script(
        "qe-eval", "--model", model, "--tasks", TASK, "--include-path", TASKS_DIR,
        "--device", "cpu", "--output", out, *extra, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("accuracy, lm-evaluation-harness "), r.stdout
    assert f"{TASK}  acc " in r.stdout  # the table
    return json.loads(out.read_text())


@torch.no_grad()
def oracle(model, tokenizer, docs: list[dict]) -> dict:
    """acc / acc_norm from direct log-likelihoods, and each item's decision margins.

    ``margins``: best minus runner-up log-likelihood (nats). ``norm_margins``: the same
    for the length-normalized scores, times the shorter of the two choices' lengths, so it
    is in nats too and compares to a drift of the log-likelihoods the same way.

    Context and continuation are split the way lm-eval documents it for causal models:
    the whole string ``question + " " + choice`` is tokenized (no special tokens, as the
    tokenizers here add none) and the continuation is what follows the question's tokens.
    A document's choices run as one right-padded batch (causal attention: the padding
    after a sequence cannot change the logits of its own positions).
    """
    correct = correct_norm = 0
    margins, norm_margins = [], []
    for doc in docs:
        ctx = tokenizer.encode(doc["question"], add_special_tokens=False)
        wholes = [tokenizer.encode(doc["question"] + " " + c, add_special_tokens=False)
                  for c in doc["choices"]]
        width = max(map(len, wholes))
        ids = torch.zeros(len(wholes), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, whole in enumerate(wholes):
            assert whole[: len(ctx)] == ctx and len(whole) > len(ctx), (doc, whole)
            ids[row, : len(whole)] = torch.tensor(whole)
            mask[row, : len(whole)] = 1
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        logp = torch.log_softmax(out.logits.float(), -1)
        lls = [
            sum(float(logp[row, i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            for row, whole in enumerate(wholes)
        ]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        first, second = sorted(range(len(lls)), key=lambda i: -lls[i])[:2]
        margins.append(lls[first] - lls[second])
        first, second = sorted(range(len(norm)), key=lambda i: -norm[i])[:2]
        shorter = min(len(doc["choices"][first]), len(doc["choices"][second]))
        norm_margins.append((norm[first] - norm[second]) * shorter)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == doc["answer"]
    return {
        "acc": correct / len(docs),
        "acc_norm": correct_norm / len(docs),
        "margins": margins,
        "norm_margins": norm_margins,
    }


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"SmolLM2 not prepared at {SMOLLM2_DIR}: run `bash serving/setup.sh` first")
    return SMOLLM2_DIR


@pytest.fixture(scope="module")
def local_result(smollm2: Path, tmp_path_factory) -> dict:
    """``qe-eval --tasks`` on the real SmolLM2-135M-Instruct, float32 on CPU."""
    return _qe_eval_tasks(smollm2, tmp_path_factory.mktemp("eval-tasks") / "local.json")


@pytest.fixture(scope="module")
def smollm2_oracle(smollm2: Path) -> dict:
    from transformers import AutoTokenizer

    model = load_model(smollm2, torch.float32, "cpu")
    return oracle(model, AutoTokenizer.from_pretrained(smollm2), DOCS)


def test_accuracy_equals_direct_loglikelihood_oracle(local_result, smollm2_oracle) -> None:
    metrics = local_result["tasks"][TASK]
    assert local_result["quantized"] is False and local_result["num_fewshot"] == 0
    assert metrics["samples"] == len(DOCS) == 18
    assert metrics["acc"] == pytest.approx(smollm2_oracle["acc"], abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(smollm2_oracle["acc_norm"], abs=1e-12)
    # lm-eval's stderr of a mean of 0/1 outcomes: the sample standard error.
    p = metrics["acc"]
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(DOCS) - 1)))
    # The easy task is well above chance (1/4) on the real model, yet not perfect: the
    # model's two wrong answers (capital vs largest city) make a gold-index or choice-order
    # bug change the count instead of hiding behind 18/18.
    assert 0.75 <= metrics["acc"] < 1.0
    assert 0.75 <= metrics["acc_norm"] < 1.0


def test_converted_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    """A qe-convert output is evaluated from its packed tensors, as perplexity is."""
    ckpt = tmp_path / "tiny-w4"
    r = run_script(
        "qe-convert", "--model", tiny_llama, "--output", ckpt, "--method", "rtn", "--bits", "4",
        "--group-size", "64", "--outlier-fraction", "0.01", "--device", "cpu",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    limit = 6
    result = _qe_eval_tasks(ckpt, tmp_path / "tiny.json", "--limit", str(limit))
    metrics = result["tasks"][TASK]
    assert result["quantized"] is True and result["limit"] == limit
    assert metrics["samples"] == limit

    from transformers import AutoTokenizer

    want = oracle(load_model(ckpt, torch.float32, "cpu"), AutoTokenizer.from_pretrained(ckpt),
                  DOCS[:limit])
    # A random model has no clear preferences: only a near-tie (< 1e-4 nats, float32
    # rounding between a batched and an unbatched forward) could differ.
    for metric, margins in (("acc", want["margins"]), ("acc_norm", want["norm_margins"])):
        ties = sum(m < 1e-4 for m in margins)
        assert abs(metrics[metric] - want[metric]) <= ties / limit + 1e-12, (metric, want)


def test_unknown_task_is_one_line(capsys) -> None:
    argv = ["--model", str(SMOLLM2_DIR), "--tasks", "qe_easy_factz",
            "--include-path", str(TASKS_DIR)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("qe-eval: error: unknown task 'qe_easy_factz'")
    assert "did you mean qe_easy_facts" in err[0]


def test_local_task_without_include_path_is_unknown(capsys) -> None:
    assert cli.main(["--model", str(SMOLLM2_DIR), "--tasks", TASK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task" in err[0] and "--include-path" in err[0], err


def test_missing_include_path_is_one_line(tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-dir"
    argv = ["--model", str(SMOLLM2_DIR), "--tasks", TASK, "--include-path", str(missing)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qe-eval: error: --include-path {missing} is not a directory"]


def test_lm_eval_missing_says_how_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    argv = ["--model", str(SMOLLM2_DIR), "--tasks", TASK, "--include-path", str(TASKS_DIR)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qe-eval: error: ")
    assert "pip install 'qe-vllm[eval]'" in err[0]


def test_data_and_tasks_together_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", "m", "--tasks", TASK, "--data", "wiki.txt"])
    assert e.value.code == 2
    assert "qe-eval: error: --data is the perplexity text" in capsys.readouterr().err


# ---------------------------------------------------------------- through vLLM (slow)


@pytest.fixture(scope="module")
def server(smollm2: Path, tmp_path_factory) -> Iterator:
    """One vLLM server on the original SmolLM2 (bf16, eager) for this module."""
    from serving.launch import serve_args
    from serving.server import VllmServer, session_pids

    tmp = tmp_path_factory.mktemp("eval-tasks-server")
    args, env = serve_args("cpu", eager=True, max_model_len=512, kv_cache_gib=1, quantized=False)
    srv = VllmServer(smollm2, *args, "--served-model-name", "smollm2", env=env, quiet=True,
                     log_path=tmp / "server.log", startup_timeout=600)
    with srv:
        yield srv
    assert session_pids(srv.pid) == []


@pytest.mark.slow
def test_server_accuracy_equals_local(server, smollm2: Path, local_result, smollm2_oracle,
                                      tmp_path) -> None:
    served = _qe_eval_tasks("smollm2", tmp_path / "served.json", "--server", server.url,
                            "--tokenizer", smollm2)
    assert served["server"] == server.url
    got, want = served["tasks"][TASK], local_result["tasks"][TASK]
    assert got["samples"] == want["samples"] == len(DOCS)
    # vLLM scores in bf16 with its own CPU kernels, the local run in float32. Only an item
    # whose float32 margin is below 2 * DRIFT_NATS can change its answer, so the accuracies
    # may differ by at most that many items (the task was chosen so that this is at most
    # one: "The capital of Turkey is", 0.64 nats; measured, the served answers are all the
    # same). Anything more is a bug in the server path (token ids, echo offsets), not drift.
    for metric, margins in (("acc", smollm2_oracle["margins"]),
                            ("acc_norm", smollm2_oracle["norm_margins"])):
        close = sum(m < 2 * DRIFT_NATS for m in margins)
        assert close <= 1, (metric, margins)
        assert abs(got[metric] - want[metric]) <= close / len(DOCS) + 1e-12, (metric, got, want)
