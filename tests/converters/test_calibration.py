"""Calibration sources: the bundled corpus, named datasets, chat rendering, window coverage."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from qe_vllm.converters import calibration
from qe_vllm.converters.calibration import (
    BUNDLED,
    DATASETS,
    calibration_set,
    describe,
    load_text,
    window_starts,
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}],
]


@pytest.fixture(scope="module")
def tok(tiny_llama: Path):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_bundled_corpus_ships_with_its_licence_and_checksums():
    """A few hundred KB of text, each file listed with its sha256 in the README beside it."""
    import hashlib

    files = sorted(BUNDLED.glob("*.txt"))
    readme = (BUNDLED / "README.md").read_text()
    assert 100_000 < sum(f.stat().st_size for f in files) < 1_000_000
    for f in files:
        assert f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}" in readme
        assert f"`{f.name}`" in readme and "public domain" in readme
    assert load_text(None).startswith(files[0].read_text(encoding="utf-8")[:1000])
    assert describe(None).startswith("bundled corpus (python-peps.txt, us-founding-documents.txt")


def test_coverage_counts_every_token_inside_a_window(tok):
    """Brute force: the union of the windows' positions, as a Python set."""
    calib = calibration_set(tok, None, 7, 300, seed=3)
    n = calib.corpus_tokens
    union = {p for s in window_starts(n, 7, 300, 3) for p in range(s, s + 300)}
    assert calib.covered_tokens == len(union)
    assert calib.windows.shape == (7, 300)
    assert f"7 windows x 300 tokens (2,100 tokens) from bundled corpus" in calib.summary()
    assert f"{n:,} tokens" in calib.summary()


def test_chat_rows_are_rendered_with_the_chat_template(tok, tmp_path):
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(CONVERSATIONS)))
    text = load_text(str(path), "chat", tok)
    assert text == "".join(tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS)
    assert text.startswith("<s>user: What is the capital of France?</s><s>assistant: Paris.</s>")
    ids = calibration.tokenize(tok, text).tolist()
    assert ids.count(tok.convert_tokens_to_ids("<s>")) == 4  # template specials stay special tokens
    with pytest.raises(ValueError, match="has no 'text' column"):
        load_text(str(path), "text", tok)  # conversations are not text
    tok.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        load_text(str(path), "chat", tok)


def test_plain_text_is_not_taken_for_conversations(tok, tmp_path):
    (tmp_path / "a.txt").write_text("plain words")
    with pytest.raises(ValueError, match="needs conversations"):
        load_text(str(tmp_path / "a.txt"), "chat", tok)
    with pytest.raises(ValueError, match="needs conversations"):
        load_text(None, "chat", tok)  # the bundled corpus is plain text


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_named_datasets_resolve_to_their_documented_split_and_field(name, tok, monkeypatch):
    """Each name reaches ``datasets.load_dataset`` with its pinned path/config/split/files."""
    named = DATASETS[name]
    calls = []
    rows = CONVERSATIONS if named.format == "chat" else ["first row", "", "second row"]

    def fake_load(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict({named.field: rows, "other": ["x"] * len(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    text = load_text(name, named.format, tok)
    want = {"split": named.split, "name": named.config, "data_files": named.data_files}
    assert calls == [(named.path, {k: v for k, v in want.items() if v is not None})]
    if named.format == "chat":
        assert text == "What is the capital of France?|Paris.|Name a prime.|Seven.|"
    else:
        assert text == "first row\n\nsecond row"
    with pytest.raises(ValueError, match=f"holds {named.format} data"):
        load_text(name, "text" if named.format == "chat" else "chat", tok)


def test_named_dataset_offline_says_it_needs_the_network(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-qe-cache")
    with pytest.raises(ValueError, match="named datasets need the network or a filled datasets cache"):
        load_text("c4")


def test_windows_are_seeded(tok):
    a = calibration_set(tok, None, 3, 50, seed=1).windows
    assert torch.equal(a, calibration_set(tok, None, 3, 50, seed=1).windows)
    assert not torch.equal(a, calibration_set(tok, None, 3, 50, seed=2).windows)
