"""Peer row: llm-compressor's GPTQ on our calibration windows, scored by our evaluation code.

Run with the separate virtualenv made by ``benchmarks/peer_setup.sh`` (llm-compressor is
not a dependency of qe-vllm and never enters ``.venv``)::

    bash benchmarks/peer_setup.sh
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        .venv-peer/bin/python benchmarks/peer_llmcompressor.py --calib wiki --seeds 0,1,2

For each seed:

1. calibration windows from ``qe_vllm.converters.calibration.calibration_windows`` -- the
   function ``qe-convert`` uses -- so the token windows are identical to ours for the same
   source, ``--nsamples``, ``--seqlen`` and seed (their SHA-256 is recorded);
2. the bf16 checkpoint loaded in float32 and quantized by llm-compressor's ``oneshot`` with
   a ``GPTQModifier`` (Linear layers except ``lm_head``; ``--bits`` integer weights in groups
   of ``--group-size``, asymmetric with an integer zero point like our grids; activation
   order ``weight`` -- llm-compressor's only supported GPTQ act-order, alias ``static``:
   columns are processed by decreasing Hessian diagonal, the groups stay contiguous in the
   original column order, as in our GPTQ; everything else at llm-compressor's defaults);
   a hook on the embedding checks that exactly our windows went through the model;
3. the fake-quantized weights written as a plain dense float32 Hugging Face checkpoint
   (no ``quantization_config``: any transformers loads it without compressed-tensors), after
   checking that every quantized linear equals ``(q - zero_point) * scale`` with integer
   codes ``q`` in the ``--bits`` range and, in the saved file, holds at most ``2**bits``
   distinct values per row and group;
4. perplexity by ``qe_vllm.cli.eval.evaluate`` (the code of ``qe-eval``) on the first
   ``--windows`` windows of 2048 tokens of WikiText-2 raw test and of *Pride and
   Prejudice* (a text neither calibration source contains).

One JSON per (calib, seed) goes to ``benchmarks/results/peer/``; an existing one is
skipped (resume). ``--reference`` also scores the unquantized model once.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EVAL_SEQLEN = 2048
WIKI_TEST = "wikitext-2-raw-test.txt"
WIKI_CALIB = "wikitext-2-v1-valid.txt"
HELDOUT_NOVEL = "prideprejudice.txt"
EVAL_TEXTS = {"wikitext2_test": WIKI_TEST, "prideprejudice": f"austen/{HELDOUT_NOVEL}"}

EPILOG = """\
examples:
  bash benchmarks/peer_setup.sh
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
      .venv-peer/bin/python benchmarks/peer_llmcompressor.py --calib wiki --seeds 0
  .venv-peer/bin/python benchmarks/peer_llmcompressor.py --calib austen --seeds 0,1,2 --reference

environment: QE_DATA_DIR (data directory, default <repo>/../shared/data),
             QE_CACHE_DIR (cache root holding models/, default <repo>/.cache)
"""


def build_parser() -> argparse.ArgumentParser:
    cache = Path(os.environ.get("QE_CACHE_DIR", "").strip() or REPO / ".cache")
    data = Path(os.environ.get("QE_DATA_DIR", "").strip() or REPO.parent / "shared" / "data")
    p = argparse.ArgumentParser(
        prog="peer_llmcompressor.py",
        description="llm-compressor GPTQ on SmolLM2 with qe-vllm's calibration windows, "
        "evaluated with qe-vllm's perplexity code (peer row for the quality benchmark).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--calib", choices=("wiki", "austen"), default="wiki",
      help=f"calibration text: wiki = {WIKI_CALIB}; austen = austen/*.txt except "
      f"{HELDOUT_NOVEL} (default %(default)s)")
    a("--seeds", default="0", help="comma-separated calibration seeds (default %(default)s)")
    a("--nsamples", type=int, default=32, help="calibration windows (default %(default)s)")
    a("--seqlen", type=int, default=512, help="tokens per calibration window (default %(default)s)")
    a("--bits", type=int, default=3, help="weight bits (default %(default)s)")
    a("--group-size", type=int, default=64, help="weights per scale/zero point (default %(default)s)")
    a("--windows", type=int, default=16,
      help=f"evaluation windows of {EVAL_SEQLEN} tokens per text (default %(default)s)")
    a("--model", type=Path, default=cache / "models" / "SmolLM2-135M-Instruct",
      help="original bf16 checkpoint (default %(default)s)")
    a("--data", type=Path, default=data, help="data directory (default %(default)s)")
    a("--results", type=Path, default=REPO / "benchmarks" / "results" / "peer",
      help="where the JSON files go (default %(default)s)")
    a("--scratch", type=Path, default=Path("/tmp/qe-peer"),
      help="dense checkpoints and the Austen link directory (default %(default)s)")
    a("--keep-checkpoints", action="store_true",
      help="keep the dense fake-quantized checkpoints in --scratch (default: delete after eval)")
    a("--reference", action="store_true",
      help="also score the unquantized model on both texts (once; reference-*.json)")
    return p


# --------------------------------------------------------------------------- helpers


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets",
                 "accelerate", "safetensors", "qe-vllm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    import torch

    from qe_vllm.machine import cpu_model, mem_gib

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": mem_gib(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "gpu": None if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "platform": platform.platform(),
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def calib_source(calib: str, data: Path, scratch: Path) -> tuple[str, list[str]]:
    """The calibration source for ``calib`` and its files, exactly as benchmarks/quality.py builds it."""
    from quality_protocol import IN_DOMAIN, OUT_OF_DOMAIN
    from quality_protocol import calib_source as quality_calib_source

    return quality_calib_source(IN_DOMAIN if calib == "wiki" else OUT_OF_DOMAIN, data, scratch)


def stem(args: argparse.Namespace, seed: int) -> str:
    return (f"llmcompressor-gptq-w{args.bits}-g{args.group_size}-{args.calib}"
            f"-n{args.nsamples}x{args.seqlen}-s{seed}-ev{args.windows}")


def evaluate_all(model_dir: Path, args: argparse.Namespace) -> dict[str, dict]:
    from qe_vllm.cli.eval import evaluate

    out = {}
    for key, rel in EVAL_TEXTS.items():
        path = args.data / rel
        print(f"  eval {key}: {path} ({args.windows} x {EVAL_SEQLEN})", flush=True)
        out[key] = evaluate(str(model_dir), str(path), EVAL_SEQLEN, args.windows, "float32", "cpu")
        print(f"    ppl {out[key]['ppl']:.4f} ({out[key]['seconds']} s)", flush=True)
    return out


# --------------------------------------------------------------------------- checks


def check_codes(model, bits: int, group_size: int) -> dict[str, Any]:
    """Every quantized linear equals ``(q - zp) * scale`` with integer codes in range."""
    import torch

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1  # compressed-tensors' signed int range
    names, worst, zp_range = [], 0.0, [None, None]
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not hasattr(mod, "weight_scale"):
            continue
        w = mod.weight.detach().double()
        out_f, in_f = w.shape
        s = mod.weight_scale.detach().double()
        zp = mod.weight_zero_point.detach().double()
        if s.shape != (out_f, in_f // group_size) or zp.shape != s.shape:
            raise AssertionError(f"{name}: scale {tuple(s.shape)} / zero point {tuple(zp.shape)} "
                                 f"do not match groups of {group_size} for {tuple(w.shape)}")
        s_full = s.repeat_interleave(group_size, 1)
        zp_full = zp.repeat_interleave(group_size, 1)
        if not bool(torch.isfinite(s).all()) or bool((s == 0).any()):
            raise AssertionError(f"{name}: zero or non-finite scales")
        q = torch.round(w / s_full + zp_full)
        if q.min() < qmin or q.max() > qmax:
            raise AssertionError(f"{name}: codes outside [{qmin}, {qmax}]")
        err = float(((q - zp_full) * s_full - w).abs().max() / s.abs().max())
        if err > 1e-4:
            raise AssertionError(f"{name}: weight is not on its grid (max error {err:.3g} scale)")
        worst = max(worst, err)
        lo, hi = float(zp.min()), float(zp.max())
        zp_range = [lo if zp_range[0] is None else min(zp_range[0], lo),
                    hi if zp_range[1] is None else max(zp_range[1], hi)]
        names.append(name)
    return {"quantized_linears": len(names), "code_range": [qmin, qmax],
            "zero_point_range": zp_range, "max_grid_error_rel_to_scale": worst}


def check_saved(ckpt: Path, linears: list[str], bits: int, group_size: int) -> dict[str, Any]:
    """In the saved file: at most 2**bits distinct values per (row, group) of every linear."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if k.endswith(".weight") and k[: -len(".weight")] in linears:
                    tensors[k] = sf.get_tensor(k)
    if len(tensors) != len(linears):
        raise AssertionError(f"saved checkpoint holds {len(tensors)} of {len(linears)} linears")
    most, dtypes = 0, set()
    for k, w in tensors.items():
        dtypes.add(str(w.dtype))
        g = w.reshape(w.shape[0], -1, group_size).sort(dim=-1).values
        distinct = 1 + (g.diff(dim=-1) != 0).sum(dim=-1)
        m = int(distinct.max())
        if m > 2**bits:
            raise AssertionError(f"{k}: {m} distinct values in a group of {group_size}")
        most = max(most, m)
    return {"linears_checked": len(tensors), "max_distinct_per_group": most,
            "limit": 2**bits, "dtypes": sorted(dtypes)}


# --------------------------------------------------------------------------- one seed


def run_seed(args: argparse.Namespace, seed: int, out_json: Path) -> dict[str, Any]:
    import shutil

    import torch
    from datasets import Dataset
    from loguru import logger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from qe_vllm.converters.calibration import calibration_windows

    t_all = time.perf_counter()
    source, files = calib_source(args.calib, args.data, args.scratch)
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(tok, source, args.nsamples, args.seqlen, seed)
    win_sha = hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()
    print(f"  windows {tuple(windows.shape)} from {source}, sha256 {win_sha[:16]}", flush=True)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    seen: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).cpu().clone()))
    dataset = Dataset.from_dict({
        "input_ids": windows.tolist(),
        "attention_mask": torch.ones_like(windows).tolist(),
    })
    weights = {
        "num_bits": args.bits, "type": "int", "symmetric": False,
        "strategy": "group", "group_size": args.group_size,
    }
    modifier = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        actorder="weight",
    )
    oneshot_kwargs = {"num_calibration_samples": args.nsamples, "max_seq_length": args.seqlen}
    llmc_warnings: list[str] = []
    gptq_losses: dict[str, float] = {}
    current: list[str] = []

    def sink(message) -> None:  # llm-compressor logs through loguru
        rec = message.record
        text, level = rec["message"], rec["level"].name
        if text.startswith("Quantizing ") and "module(s): [" in text:
            current[:] = [n.strip(" '\"") for n in text.split("[", 1)[1].rstrip("]").split(",")]
        elif level == "METRIC" and text.startswith("error ") and len(current) == 1:
            gptq_losses[current[0]] = float(text.split()[1])
        elif level in ("WARNING", "ERROR", "CRITICAL") and text not in llmc_warnings:
            llmc_warnings.append(text)

    sink_id = logger.add(sink, level="INFO")
    t0 = time.perf_counter()
    try:
        model = oneshot(model=model, tokenizer=tok, recipe=modifier, dataset=dataset,
                        **oneshot_kwargs)
    finally:
        logger.remove(sink_id)
    quant_seconds = time.perf_counter() - t0
    hook.remove()
    print(f"  oneshot done in {quant_seconds:.1f} s", flush=True)

    # exactly our windows went through the model (in llm-compressor's sampler order)
    rows = {tuple(r.tolist()) for s in seen for r in s if r.numel() == args.seqlen}
    want = {tuple(r.tolist()) for r in windows}
    if rows != want:
        raise AssertionError(f"model saw {len(rows)} distinct windows, {len(rows & want)} of our "
                             f"{len(want)}")
    fed = {"distinct_windows_seen": len(rows), "embedding_calls": len(seen),
           "all_equal_to_our_windows": True}

    first = next(m for m in model.modules() if hasattr(m, "quantization_scheme"))
    scheme = first.quantization_scheme.model_dump(mode="json")
    recipe = {
        "modifier": "GPTQModifier",
        "arguments": {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                      "ignore": ["lm_head"], "actorder": "weight"},
        "resolved": {
            "block_size": modifier.block_size,
            "dampening_frac": modifier.dampening_frac,
            "actorder": str(scheme["weights"].get("actorder")),
            "scheme_as_applied": scheme,
        },
        "oneshot": {**oneshot_kwargs, "dataset": "datasets.Dataset of our token windows "
                    "(input_ids + all-ones attention_mask)", "other_arguments": "defaults"},
        "symmetry": "asymmetric (symmetric=False): integer zero point per group, like our grids",
        "activation_order": "weight (llm-compressor's only GPTQ act-order; 'static' is its alias, "
                            "'group' is refused): columns in decreasing diag(H) order, groups "
                            "contiguous in the original column order (static groups, no g_idx)",
    }
    codes = check_codes(model, args.bits, args.group_size)
    linears = [n for n, m in model.named_modules() if hasattr(m, "weight_scale")]

    # dense checkpoint: a fresh copy of the original, with the quantized linear weights put in
    ckpt = args.scratch / stem(args, seed)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    qparams = dict(model.named_parameters())
    changed_other = []
    with torch.no_grad():
        for name, p in dense.named_parameters():
            q = qparams[name]
            if name[: -len(".weight")] in linears and name.endswith(".weight"):
                p.copy_(q)
            elif not torch.equal(p, q):
                changed_other.append(name)
    if changed_other:
        raise AssertionError(f"llm-compressor changed non-quantized parameters: {changed_other}")
    del model, qparams
    gc.collect()
    dense.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    del dense
    gc.collect()
    cfg = json.loads((ckpt / "config.json").read_text())
    if "quantization_config" in cfg:
        raise AssertionError("dense checkpoint config carries a quantization_config")
    saved = check_saved(ckpt, linears, args.bits, args.group_size)
    print(f"  dense checkpoint {ckpt}: {saved}", flush=True)

    ev = evaluate_all(ckpt, args)
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt)
    return {
        "method": "llm-compressor GPTQ",
        "calib": args.calib,
        "seed": seed,
        "bits": args.bits,
        "group_size": args.group_size,
        "ppl": {k: v["ppl"] for k, v in ev.items()},
        "eval": ev,
        "protocol": {
            "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": seed,
            "eval_windows": args.windows, "eval_seqlen": EVAL_SEQLEN,
            "eval_texts": {k: str(args.data / v) for k, v in EVAL_TEXTS.items()},
            "eval_code": "qe_vllm.cli.eval.evaluate(model_dir, text, 2048, windows, 'float32', 'cpu')",
        },
        "calibration": {
            "source": source, "files": files,
            "windows_function": "qe_vllm.converters.calibration.calibration_windows",
            "windows_shape": list(windows.shape), "windows_sha256_int64": win_sha,
            "fed_to_model": fed,
        },
        "model": str(args.model),
        "model_load_dtype": "float32",
        "recipe": recipe,
        "checks": {"grid": codes, "saved_checkpoint": saved,
                   "non_quantized_parameters_unchanged": True,
                   "saved_config_has_quantization_config": False,
                   "kept_checkpoint": str(ckpt) if args.keep_checkpoints else None},
        "llmcompressor_warnings": llmc_warnings,
        "gptq_loss_per_linear": gptq_losses,
        "seconds": {
            "quantize_oneshot": round(quant_seconds, 2),
            **{f"eval_{k}": v["seconds"] for k, v in ev.items()},
            "total": round(time.perf_counter() - t_all, 2),
        },
    }


# --------------------------------------------------------------------------- table


def table(args: argparse.Namespace) -> str:
    pattern = (f"llmcompressor-gptq-w{args.bits}-g{args.group_size}-*-n{args.nsamples}x"
               f"{args.seqlen}-s*-ev{args.windows}.json")
    rows = [json.loads(p.read_text()) for p in sorted(args.results.glob(pattern))]
    keys = list(EVAL_TEXTS)
    head = (f"| calib | seed | {' | '.join(f'ppl {k}' for k in keys)} | oneshot s | "
            f"eval s ({'+'.join(keys)}) |")
    lines = [f"llm-compressor GPTQ W{args.bits} g{args.group_size}, calibration "
             f"{args.nsamples} x {args.seqlen}, eval {args.windows} x {EVAL_SEQLEN} "
             f"({args.results})", "", head, "|" + "---|" * (head.count("|") - 1)]
    ref = args.results / f"reference-fp32-ev{args.windows}.json"
    if ref.is_file():
        r = json.loads(ref.read_text())
        ppl = " | ".join(f"{r['ppl'][k]:.4f}" for k in keys)
        secs = "+".join(f"{r['eval'][k]['seconds']:.0f}" for k in keys)
        lines.append(f"| unquantized | - | {ppl} | - | {secs} |")
    for calib in ("wiki", "austen"):
        sub = sorted((r for r in rows if r["calib"] == calib), key=lambda r: r["seed"])
        for r in sub:
            ppl = " | ".join(f"{r['ppl'][k]:.4f}" for k in keys)
            secs = "+".join(f"{r['seconds']['eval_' + k]:.0f}" for k in keys)
            lines.append(f"| {calib} | {r['seed']} | {ppl} | "
                         f"{r['seconds']['quantize_oneshot']:.0f} | {secs} |")
        if len(sub) >= 2:
            cells = []
            for k in keys:
                v = [r["ppl"][k] for r in sub]
                cells.append(f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}")
            lines.append(f"| {calib} | mean ± std (n={len(sub)}, sample std) | "
                         f"{' | '.join(cells)} | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"--seeds: expected comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    args.model, args.data = args.model.resolve(), args.data.resolve()
    for f in (args.data / WIKI_TEST, args.data / "austen" / HELDOUT_NOVEL):
        if not f.is_file():
            print(f"missing evaluation text {f} (set QE_DATA_DIR or --data)", file=sys.stderr)
            return 2
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model} (run serving/setup.sh or pass --model)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.results.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    common = {"versions": versions(), "machine": machine(), "command": command,
              "cwd": os.getcwd()}

    if args.reference:
        ref = args.results / f"reference-fp32-ev{args.windows}.json"
        if ref.is_file():
            print(f"reference: {ref} exists, skipped")
        else:
            print(f"reference: unquantized {args.model}", flush=True)
            t0 = time.perf_counter()
            ev = evaluate_all(args.model, args)
            write_json(ref, {"method": "unquantized (bf16 checkpoint, float32 compute)",
                             "ppl": {k: v["ppl"] for k, v in ev.items()}, "eval": ev,
                             "seconds": {"total": round(time.perf_counter() - t0, 2)}, **common})
    for seed in seeds:
        out = args.results / f"{stem(args, seed)}.json"
        if out.is_file():
            print(f"{out.name}: exists, skipped")
            continue
        print(f"{out.name}: calib {args.calib}, seed {seed}", flush=True)
        result = run_seed(args, seed, out)
        write_json(out, {**result, **common})
        print(f"  wrote {out} ({result['seconds']['total']:.0f} s)", flush=True)
        gc.collect()
    print()
    print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
