"""End to end: qe-convert the real SmolLM2 → `vllm serve --quantization quantease` → OpenAI client.

The server runs vLLM's default CPU compilation (no ``--enforce-eager``). Its greedy
completion is checked against an independent loader of the same checkpoint
(transformers with packed linears, ``converters/hf_loading.py``), and the server must
leave no process behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import SMOLLM2_DIR, run_script

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serving.server import VllmServer, session_pids  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
COMPARED_TOKENS = 6


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.fail(f"default model missing at {SMOLLM2_DIR}: run `bash serving/setup.sh` first")
    return SMOLLM2_DIR


def transformers_greedy(ckpt: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from qe_vllm.converters.hf_loading import load_quantease_model

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = load_quantease_model(ckpt, torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_convert_serve_and_query(smollm2: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "smollm2-w4-o1"
    proc = run_script(
        "qe-convert", "--model", smollm2, "--output", ckpt, "--bits", "4", "--group-size", "128",
        "--method", "rtn", "--outlier-fraction", "0.01",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bits/weight" in proc.stdout
    expected = transformers_greedy(ckpt, COMPARED_TOKENS)

    server = VllmServer(ckpt, "--quantization", "quantease", "--max-model-len", "512", quiet=True,
                        log_path=tmp_path / "server.log")
    with server:
        client = server.openai_client()
        completion = client.completions.create(
            model=server.model_name, prompt=PROMPT, max_tokens=12, temperature=0.0, logprobs=1
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
    tokens = completion.choices[0].logprobs.tokens
    from transformers import AutoTokenizer

    served_ids = AutoTokenizer.from_pretrained(ckpt).convert_tokens_to_ids(tokens)
    assert served_ids[:COMPARED_TOKENS] == expected, (text, expected)
    assert "Paris" in text
    assert "Paris" in chat.choices[0].message.content
    assert session_pids(sid) == []  # nothing left running
