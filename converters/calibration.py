"""Calibration and evaluation text: read it, tokenize it, cut seeded random windows.

Sources, all read offline:

* a ``.txt`` file — taken as given (the evaluation string of the GPTQ protocol);
* a directory — every ``*.txt`` in it, sorted by name, joined by blank lines;
* a ``.json`` / ``.jsonl`` / ``.parquet`` file — rows of its ``text`` column
  (or its only string column), joined by blank lines;
* otherwise a ``datasets`` name ``NAME[:CONFIG][@SPLIT]`` (split defaults to
  ``train``), loaded from the local cache when ``HF_DATASETS_OFFLINE=1``.

Windows are drawn with a ``torch.Generator`` seeded by the caller, so the same
seed gives the same calibration set on every machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

_TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_text(source: str) -> str:
    """The text of ``source`` as one string (see the module docstring for what ``source`` may be)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"calibration directory {path} holds no .txt files")
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    elif path.is_file() and path.suffix in _TABLE_SUFFIXES:
        text = _rows_text(
            _TABLE_SUFFIXES[path.suffix], {"data_files": str(path), "split": "train"}, source
        )
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
    elif path.suffix in (".txt", *_TABLE_SUFFIXES) or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"text source {source} does not exist")
    else:
        text = _dataset_text(source)
    if not text.strip():
        raise ValueError(f"text source {source} is empty")
    return text


def _dataset_text(spec: str) -> str:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return _rows_text(name, {"name": config or None, "split": split or "train"}, spec)


def _rows_text(builder: str, kwargs: dict, source: str) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(builder, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
        raise ValueError(f"cannot load text source {source!r} ({type(e).__name__}: {e})") from None
    columns = [
        c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")
    ]
    column = "text" if "text" in columns else (columns[0] if len(columns) == 1 else None)
    if column is None:
        raise ValueError(f"text source {source!r} has no 'text' column (string columns: {columns})")
    return "\n\n".join(row for row in ds[column] if row)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 token ids of ``text`` without special tokens (GPTQ protocol)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def random_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str
) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows starting at seeded uniform random offsets."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must be positive")
    if tokens.numel() < seqlen + 1:
        raise ValueError(
            f"calibration data {source} has {tokens.numel()} tokens, too few for windows of seqlen={seqlen}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def calibration_windows(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """Seeded random token windows ``[nsamples, seqlen]`` from ``source``."""
    return random_windows(tokenize(tokenizer, load_text(source)), nsamples, seqlen, seed, source)
