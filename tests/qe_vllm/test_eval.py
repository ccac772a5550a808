"""``qe-eval``: perplexity of the original and of a converted checkpoint read from disk."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.env import run_script
from qe_vllm.cli import eval as cli
from qe_vllm.converters.calibration import load_text, tokenize
from qe_vllm.converters.checkpoint import dense_reference
from qe_vllm.converters.pipeline import ConvertOptions, convert

WINDOWS = ("--seqlen", "256", "--windows", "2", "--device", "cpu")


def _qe_eval(model, data, tmp_path, name):
    out = tmp_path / f"{name}.json"
    r = run_script("qe-eval", "--model", model, "--data", data, *WINDOWS, "--output", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def eval_text(data_dir):
    return str(data_dir / "wikitext-2-raw-test.txt")


def test_converted_checkpoint_matches_dense_reference(smollm2_2blocks, eval_text, tmp_path):
    converted = convert(
        str(smollm2_2blocks),
        tmp_path / "w4",
        ConvertOptions(method="rtn", bits=4, group_size=128, outlier_fraction=0.01),
        device="cpu",
    ).output
    dense_reference(converted, tmp_path / "w4-dense")

    original = _qe_eval(smollm2_2blocks, eval_text, tmp_path, "original")
    quant = _qe_eval(converted, eval_text, tmp_path, "quant")
    assert original["quantized"] is False and quant["quantized"] is True
    assert quant["windows"] == 2 and quant["tokens_scored"] == 2 * 255
    # qe-eval dequantizes each linear once at load; the lean per-call path gives the same number.
    assert quant["dequantize"] == "once" and "dequantize" not in original
    per_call = cli.evaluate(
        str(converted), eval_text, 256, 2, "float32", "cpu", dequantize="per-call"
    )
    assert per_call["dequantize"] == "per-call" and per_call["ppl"] == quant["ppl"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = tokenize(AutoTokenizer.from_pretrained(smollm2_2blocks), load_text(eval_text))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "w4-dense", dtype=torch.float32).eval()
    ppl_dense, _ = cli.perplexity(dense, tokens, 256, 2, torch.device("cpu"))

    # The on-disk checkpoint computes what its dense oracle computes, up to the oracle's bf16 weights.
    assert abs(quant["ppl"] - ppl_dense) / ppl_dense < 0.01, (quant["ppl"], ppl_dense)
    # 2 of 30 blocks is no language model (ppl ~1e8, worse than uniform): the dense oracle, not the
    # original, is the yardstick here; the real-model comparison is the qe-eval run on all 30 blocks.
    assert math.isfinite(original["ppl"]) and math.isfinite(quant["ppl"])


def test_too_short_text_is_a_clear_error(smollm2_2blocks, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of tokens.")
    assert cli.main(["--model", str(smollm2_2blocks), "--data", str(short), *WINDOWS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than one window" in err[0]
