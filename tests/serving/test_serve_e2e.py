"""End to end: qe-convert the real SmolLM2 → `vllm serve --quantization quantease` → OpenAI client.

The checkpoint is the session's ``smollm2_w4_o1`` (``tests/conftest.py``). The server runs
vLLM's default CPU compilation (no ``--enforce-eager``). Its greedy completion and chat
answer are checked against an independent loader of the same checkpoint
(transformers with packed linears in float32, ``converters/hf_loading.py``): every served
token must be the float32 argmax, or within a bf16-sized margin of it (the server computes
in bf16, so near-ties may break either way). The server must leave no process behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.server import VllmServer, session_pids

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
NEAR_TIE = 0.1  # logprob margin within which bf16 serving may pick another greedy token


def greedy_logprobs(model, prompt_ids: list[int], served_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logprobs of the served tokens, and the best logprob, at each generated position."""
    ids = torch.tensor([prompt_ids + served_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1 : -1].float(), dim=-1)
    return logprobs[torch.arange(len(served_ids)), torch.tensor(served_ids)], logprobs.max(dim=-1).values


def served_ids(logprob_tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprob_tokens]


def test_convert_serve_and_query(smollm2_w4_o1: Path, tmp_path: Path) -> None:
    """Completion and chat, each greedy token checked against the float32 transformers loader."""
    from transformers import AutoTokenizer

    from qe_vllm.converters.hf_loading import load_quantease_model

    ckpt = smollm2_w4_o1
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    server = VllmServer(ckpt, "--quantization", "quantease", "--max-model-len", "512", quiet=True,
                        log_path=tmp_path / "server.log")
    with server:
        client = server.openai_client()
        completion = client.completions.create(
            model=server.model_name, prompt=PROMPT, max_tokens=12, temperature=0.0, logprobs=1,
            extra_body={"return_tokens_as_token_ids": True},
        )
        chat = client.chat.completions.create(
            model=server.model_name, messages=messages, max_tokens=24, temperature=0.0, logprobs=True,
            extra_body={"return_tokens_as_token_ids": True},
        )
        sid = server.pid
        # 30 blocks x (qkv, o, gate_up, down): merged layers count once
        assert "QuantEase: 120 linear layers resident" in server.log_tail(400)

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = load_quantease_model(ckpt, torch.float32)
    chat_prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False).input_ids
    for prompt_ids, ids, text in (
        (tok(PROMPT).input_ids, served_ids(completion.choices[0].logprobs.tokens), completion.choices[0].text),
        (chat_prompt, served_ids([t.token for t in chat.choices[0].logprobs.content]),
         chat.choices[0].message.content),
    ):
        chosen, best = greedy_logprobs(model, prompt_ids, ids)
        assert bool((chosen >= best - NEAR_TIE).all()), (text, chosen, best)
    assert "Paris" in completion.choices[0].text
    assert session_pids(sid) == []  # nothing left running
