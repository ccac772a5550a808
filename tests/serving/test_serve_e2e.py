"""End to end: qe-convert the real SmolLM2 → `vllm serve --quantization quantease` → OpenAI client.

The server runs vLLM's default CPU compilation (no ``--enforce-eager``). Its greedy
completion is checked against an independent loader of the same checkpoint
(transformers with packed linears in float32, ``converters/hf_loading.py``): every served
token must be the float32 argmax, or within a bf16-sized margin of it (the server computes
in bf16, so near-ties may break either way). The server must leave no process behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.env import SMOLLM2_DIR, run_script
from serving.server import VllmServer, session_pids

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
NEAR_TIE = 0.1  # logprob margin within which bf16 serving may pick another greedy token


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"default model missing at {SMOLLM2_DIR}: run `bash serving/setup.sh` first")
    return SMOLLM2_DIR


def transformers_logprobs(ckpt: Path, prompt_ids: list[int], served_ids: list[int]) -> torch.Tensor:
    """Float32 log-probabilities ``[len(served), vocab]`` of the positions that produced ``served_ids``."""
    from qe_vllm.converters.hf_loading import load_quantease_model

    model = load_quantease_model(ckpt, torch.float32)
    ids = torch.tensor([prompt_ids + served_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_convert_serve_and_query(smollm2: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "smollm2-w4-o1"
    proc = run_script(
        "qe-convert", "--model", smollm2, "--output", ckpt, "--bits", "4", "--group-size", "128",
        "--method", "rtn", "--outlier-fraction", "0.01",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bits/weight" in proc.stdout

    server = VllmServer(ckpt, "--quantization", "quantease", "--max-model-len", "512", quiet=True,
                        log_path=tmp_path / "server.log")
    with server:
        client = server.openai_client()
        completion = client.completions.create(
            model=server.model_name, prompt=PROMPT, max_tokens=12, temperature=0.0, logprobs=1,
            extra_body={"return_tokens_as_token_ids": True},
        )
        chat = client.chat.completions.create(
            model=server.model_name,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0.0,
        )
        sid = server.pid
        # 30 blocks x (qkv, o, gate_up, down): merged layers count once
        assert "QuantEase: 120 linear layers resident" in server.log_tail(400)

    text = completion.choices[0].text
    served_ids = [int(t.removeprefix("token_id:")) for t in completion.choices[0].logprobs.tokens]
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(ckpt)(PROMPT).input_ids
    logprobs = transformers_logprobs(ckpt, prompt_ids, served_ids)
    chosen = logprobs[torch.arange(len(served_ids)), torch.tensor(served_ids)]
    assert bool((chosen >= logprobs.max(dim=-1).values - NEAR_TIE).all()), (text, chosen, logprobs.max(-1))
    assert "Paris" in text
    assert "Paris" in chat.choices[0].message.content
    assert session_pids(sid) == []  # nothing left running
