"""Calibration and evaluation text: read it, tokenize it, cut seeded random windows.

Sources (``--calib-data``):

* nothing — the bundled corpus (:data:`BUNDLED`, ``converters/data/calibration/``):
  public-domain prose and technical writing that ships with the package, so a
  conversion needs neither a network nor a file of the user's;
* a ``.txt`` file — taken as given (the evaluation string of the GPTQ protocol);
* a directory — every ``*.txt`` in it, sorted by name, joined by blank lines;
* a ``.json`` / ``.jsonl`` / ``.parquet`` file — rows of its ``text`` column (or
  its only string column; ``messages`` with ``--calib-format chat``);
* a name of :data:`DATASETS` (``wikitext2``, ``c4``, ``pileval``, ``ultrachat``)
  — a documented dataset, split and field, loaded through ``datasets``;
* otherwise a ``datasets`` name ``NAME[:CONFIG][@SPLIT]`` (split defaults to ``train``).

``--calib-format chat`` renders each conversation (a list of ``{"role", "content"}``)
with the tokenizer's chat template, so an instruct model is calibrated on the
token stream it will be served — special tokens included.

Windows are drawn with a ``torch.Generator`` seeded by the caller, so the same
seed gives the same calibration set on every machine. A small corpus yields
overlapping windows; :class:`Calibration` says how much of the text they cover.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BUNDLED = Path(__file__).resolve().parent / "data" / "calibration"
FORMATS = ("text", "chat")
_TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class NamedDataset:
    """A calibration dataset every peer tool knows by name, pinned to one split and field."""

    path: str
    split: str
    field: str
    format: str = "text"
    config: str | None = None
    data_files: str | None = None


DATASETS: dict[str, NamedDataset] = {
    # WikiText-2 raw train (the GPTQ papers' calibration set; never its test split).
    "wikitext2": NamedDataset("wikitext", "train", "text", config="wikitext-2-raw-v1"),
    # The first shard of English C4, cut to 20k documents (GPTQ's other calibration set).
    "c4": NamedDataset(
        "allenai/c4", "train[:20000]", "text", data_files="en/c4-train.00000-of-01024.json.gz"
    ),
    # The Pile's validation set (AWQ's default).
    "pileval": NamedDataset("mit-han-lab/pile-val-backup", "validation[:20000]", "text"),
    # UltraChat conversations as served to chat models (llm-compressor's examples).
    "ultrachat": NamedDataset("HuggingFaceH4/ultrachat_200k", "train_sft[:4000]", "messages", "chat"),
}


@dataclass(frozen=True)
class Calibration:
    """Calibration windows and what they were cut from."""

    windows: torch.Tensor  # [nsamples, seqlen] int64
    source: str  # what --calib-data resolved to (absolute path or dataset name)
    corpus_tokens: int
    covered_tokens: int  # distinct corpus positions inside at least one window

    def summary(self) -> str:
        n, seqlen = self.windows.shape
        return (
            f"calibration: {n} windows x {seqlen} tokens ({n * seqlen:,} tokens) from "
            f"{self.source}: {self.corpus_tokens:,} tokens, {self.covered_tokens / self.corpus_tokens:.0%} "
            "of them in at least one window"
        )


def describe(source: str | None) -> str:
    """What ``source`` names, stable across machines: a resolved path, a dataset, or the bundle."""
    if source is None:
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in _bundled_files())).hexdigest()
        return f"bundled corpus ({', '.join(f.name for f in _bundled_files())}; sha256 {digest[:16]})"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def load_text(source: str | None, fmt: str = "text", tokenizer: Any = None) -> str:
    """The text of ``source`` as one string (see the module docstring for what it may be).

    With ``fmt="chat"`` every conversation is rendered by ``tokenizer``'s chat template.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--calib-format {fmt}: choose one of {', '.join(FORMATS)}")
    if source is None:
        return _render([_join(f.read_text(encoding="utf-8") for f in _bundled_files())], fmt, tokenizer,
                       "the bundled corpus")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"calibration directory {path} holds no .txt files")
        rows: list = [_join(f.read_text(encoding="utf-8") for f in files)]
    elif path.is_file() and path.suffix in _TABLE_SUFFIXES:
        table = _load(source, _TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train")
        rows = _column(table, source, "messages" if fmt == "chat" else "text")
    elif path.is_file():
        rows = [path.read_text(encoding="utf-8")]
    elif path.suffix in (".txt", *_TABLE_SUFFIXES) or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"text source {source} does not exist")
    elif source in DATASETS:
        named = DATASETS[source]
        if named.format != fmt:
            raise ValueError(f"--calib-data {source} holds {named.format} data: pass --calib-format {named.format}")
        table = _load(source, named.path, name=named.config, split=named.split, data_files=named.data_files)
        rows = _column(table, source, named.field)
    else:
        name, _, split = source.partition("@")
        name, _, config = name.partition(":")
        table = _load(source, name, name=config or None, split=split or "train")
        rows = _column(table, source, "messages" if fmt == "chat" else "text")
    text = _render(rows, fmt, tokenizer, source)
    if not text.strip():
        raise ValueError(f"text source {source} is empty")
    return text


def _bundled_files() -> list[Path]:
    files = sorted(BUNDLED.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"the bundled calibration corpus is missing from {BUNDLED}; reinstall qe-vllm")
    return files


def _join(texts) -> str:
    return "\n\n".join(t for t in texts if t)


def _load(source: str, builder: str, **kwargs: Any):
    import datasets

    try:
        return datasets.load_dataset(builder, **{k: v for k, v in kwargs.items() if v is not None})
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
        hint = " (named datasets need the network or a filled datasets cache)" if source in DATASETS else ""
        raise ValueError(f"cannot load text source {source!r}{hint} ({type(e).__name__}: {e})") from None


def _column(table, source: str, want: str) -> list:
    """The rows of column ``want``; for text, the only string column will do."""
    if want in table.column_names:
        return list(table[want])
    strings = [c for c, f in table.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if want == "text" and len(strings) == 1:
        return list(table[strings[0]])
    raise ValueError(f"text source {source!r} has no {want!r} column (columns: {table.column_names})")


def _render(rows: list, fmt: str, tokenizer: Any, source: str) -> str:
    if fmt == "text":
        return _join(rows)
    if not all(isinstance(r, list) for r in rows):
        raise ValueError(
            f"--calib-format chat needs conversations (lists of {{'role', 'content'}} messages); "
            f"{source} holds plain text"
        )
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("--calib-format chat needs a tokenizer with a chat template; this model has none")
    return "".join(tokenizer.apply_chat_template(r, tokenize=False) for r in rows if r)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text`` without added special tokens (GPTQ protocol).

    Special tokens written *in* the text (a rendered chat template's) are still parsed as such.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def window_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Seeded uniform random offsets of ``nsamples`` windows of ``seqlen`` in ``n_tokens``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seqlen, (nsamples,), generator=gen).tolist()


def random_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str
) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows of ``tokens`` at :func:`window_starts`."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must be positive")
    if tokens.numel() < seqlen + 1:
        raise ValueError(
            f"calibration data {source} has {tokens.numel()} tokens, too few for windows of seqlen={seqlen}"
        )
    starts = window_starts(tokens.numel(), nsamples, seqlen, seed)
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def calibration_set(
    tokenizer, source: str | None, nsamples: int, seqlen: int, seed: int, fmt: str = "text"
) -> Calibration:
    """Seeded random token windows ``[nsamples, seqlen]`` from ``source`` (``None``: the bundle)."""
    label = describe(source)
    tokens = tokenize(tokenizer, load_text(source, fmt, tokenizer))
    windows = random_windows(tokens, nsamples, seqlen, seed, label)
    covered = torch.zeros(tokens.numel(), dtype=torch.bool)
    for s in window_starts(tokens.numel(), nsamples, seqlen, seed):
        covered[s : s + seqlen] = True
    return Calibration(windows, label, tokens.numel(), int(covered.sum()))


def calibration_windows(
    tokenizer, source: str | None, nsamples: int, seqlen: int, seed: int, fmt: str = "text"
) -> torch.Tensor:
    """Just the windows of :func:`calibration_set` (benchmarks and tests)."""
    return calibration_set(tokenizer, source, nsamples, seqlen, seed, fmt).windows
