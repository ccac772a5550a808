"""The OpenAI API of one quantized SmolLM2 server: the features clients rely on.

One server for the whole module (W4 g128 + 1% outliers, ``--enforce-eager``, the CPU
flags of ``serving/launch.py``), started once and stopped at the end with nothing left
behind. Checked: many concurrent clients, streaming (completions and chat), stop
sequences, ``max_tokens``, logprobs, the model's chat template, vLLM's 404 for an
unknown model name, and ``qe-eval --server`` (perplexity from prompt logprobs) against
the transformers path on the same checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.env import REPO, run_script
from serving.launch import serve_args
from serving.server import VllmServer, session_pids

pytestmark = pytest.mark.slow
NAME = "smollm2-qe"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CLIENTS = 16


@pytest.fixture(scope="module")
def server(smollm2_w4_o1: Path, tmp_path_factory) -> Iterator[VllmServer]:
    ckpt, tmp = smollm2_w4_o1, tmp_path_factory.mktemp("serving-api")
    args, env = serve_args("cpu", eager=True, max_model_len=512, kv_cache_gib=1)
    srv = VllmServer(ckpt, *args, "--served-model-name", NAME, env=env, quiet=True,
                     log_path=tmp / "server.log", startup_timeout=600)
    with srv:
        yield srv
    assert session_pids(srv.pid) == []


@pytest.fixture(scope="module")
def client(server: VllmServer):
    return server.openai_client(timeout=300)


@pytest.fixture(scope="module")
def tokenizer(server: VllmServer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.model)


def test_concurrent_clients_are_all_answered(client) -> None:
    prompts = [f"Question {i}: name a colour that starts with the letter {chr(65 + i)}." for i in range(CLIENTS)]

    def ask(prompt: str):
        return client.completions.create(
            model=NAME, prompt=prompt, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
        )

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(ask, prompts))
    assert len(answers) == CLIENTS
    for a in answers:
        assert a.choices[0].text and a.choices[0].finish_reason == "length"
        assert a.usage.completion_tokens == 8


def test_streaming_matches_non_streaming(client) -> None:
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0.0)
    chunks = list(client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=12, temperature=0.0, stream=True
    ))
    assert len(chunks) > 2  # token by token, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text

    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0.0)
    deltas = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=16, temperature=0.0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in deltas if c.choices)
    assert streamed == chat.choices[0].message.content
    assert streamed.strip()  # what the answer says is checked against a float32 oracle in test_serve_e2e


def test_stop_sequence_ends_the_output(client) -> None:
    free = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0.0)
    text = free.choices[0].text
    stop = text.strip().split()[1]  # the second word of the greedy answer
    stopped = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=24, temperature=0.0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]  # stop string excluded


def test_max_tokens_is_exact(client) -> None:
    out = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=5, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 5
    assert out.choices[0].finish_reason == "length"


def test_logprobs(client) -> None:
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0.0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0.0
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the best
        assert top[token] == pytest.approx(logprob)

    chat = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0.0 for t in content)


def test_chat_template_is_applied(client, server: VllmServer, tokenizer) -> None:
    expected = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    served = server.post_json("/tokenize", {"model": NAME, "messages": MESSAGES, "add_generation_prompt": True})
    assert served["tokens"] == list(expected)
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=1, temperature=0.0)
    assert chat.usage.prompt_tokens == len(expected)
    assert "<|im_start|>assistant" in tokenizer.decode(expected)  # SmolLM2's template


def test_unknown_model_is_a_404(client) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 404
    assert "no-such-model" in str(err.value) and "does not exist" in str(err.value)


def test_perplexity_through_server_matches_transformers(server: VllmServer, data_dir: Path, tmp_path: Path) -> None:
    """``qe-eval --server`` (bf16, vLLM's kernels) vs. ``qe-eval`` in transformers (float32,
    packed tensors), 2 WikiText-2 windows of 256 tokens: within 1%."""
    common = ("--data", data_dir / "wikitext-2-raw-test.txt", "--seqlen", "256", "--windows", "2")
    served = run_script("qe-eval", "--server", server.url, "--model", NAME, "--tokenizer", server.model,
                        *common, "--output", tmp_path / "served.json")
    assert served.returncode == 0, served.stderr[-3000:]
    assert "served by" in served.stdout
    local = run_script("qe-eval", "--model", server.model, *common, "--device", "cpu",
                       "--output", tmp_path / "local.json")
    assert local.returncode == 0, local.stderr[-3000:]
    s, t = (json.loads((tmp_path / f).read_text()) for f in ("served.json", "local.json"))
    assert s["tokens_scored"] == t["tokens_scored"] == 2 * 255
    assert abs(s["ppl"] - t["ppl"]) / t["ppl"] < 0.01, (s["ppl"], t["ppl"])


def test_client_example_runs(server: VllmServer) -> None:
    """``serving/client_example.py`` (completion, chat, streamed chat) against the server."""
    example = REPO / "serving" / "client_example.py"
    proc = run_script("python", example, "--base-url", server.url + "/v1", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model: {NAME}" in proc.stdout
    lines = proc.stdout.count("top-2: ")  # one line per generated token
    assert lines == 8 or (0 < lines < 8 and "(finish: stop)" in proc.stdout), proc.stdout
    assert "streamed chat: " in proc.stdout and "usage:" in proc.stdout


def test_load_benchmark_accounts_for_every_request(server: VllmServer, tmp_path: Path) -> None:
    """``serving/bench.py``: every request answered and counted, every token streamed and timed."""
    bench = REPO / "serving" / "bench.py"
    out = tmp_path / "bench.json"
    proc = run_script("python", bench, "--url", server.url, "--model", NAME, "--concurrency", "1,4",
                      "--requests", "6", "--max-seconds", "300", "--max-tokens", "8", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    levels = json.loads(out.read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for lv in levels:
        assert lv["requests_sent"] == lv["requests_ok"] == 6 and lv["requests_failed"] == 0
        assert lv["output_tokens"] == 6 * 8  # ignore_eos: exactly max_tokens each
        assert lv["output_tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["wall_seconds"], rel=1e-3)
        assert 0 < lv["ttft_ms"]["p50"] <= lv["latency_ms"]["p99"]
        assert 0 < lv["itl_ms"]["p50"] <= lv["itl_ms"]["p99"]
    remote = run_script("python", bench, "--url", "http://192.0.2.1:8000", "--model", NAME)
    assert remote.returncode == 2 and "loopback" in remote.stderr
