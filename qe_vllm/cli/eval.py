"""``qe-eval``: perplexity (GPTQ protocol) or task accuracy (lm-evaluation-harness) of a model.

The text is taken as given, tokenized without special tokens and cut into
non-overlapping windows of ``--seqlen`` tokens; ``ppl = exp(mean NLL)`` over all
predicted tokens. A QuantEase checkpoint is evaluated from its packed tensors on
disk (``qe_vllm.converters.hf_loading``), not from a dense checkpoint: by default
(``--dequantize once``) each quantized linear is dequantized once at load and the dense
weight kept, which gives the same numbers as ``--dequantize per-call`` (no dense weight
resident, every forward pass dequantizes every linear again: lean and much slower).

With ``--server URL`` nothing is loaded locally: each window is sent as token ids to
the server's OpenAI ``/v1/completions`` endpoint with ``echo``, ``logprobs`` and
``max_tokens=0``, and the returned prompt logprobs are scored the same way. That
measures the model exactly as it is served (vLLM's kernels, dtype, and plugin).

With ``--tasks T1,T2`` the command reports accuracy instead, computed by
lm-evaluation-harness (the ``lm_eval`` package, extra ``qe-vllm[eval]``), not by scoring
code of ours: the model loaded as above is handed to its ``HFLM`` wrapper, or, with
``--server``, requests go through its ``local-completions`` model (prompt logprobs from
``/v1/completions``, token ids sent as they are). Tasks are lm-eval task names; local task
YAMLs come from ``--include-path`` (see :func:`task_specs` for how their data files resolve).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from qe_vllm.converters.calibration import load_text, tokenize
from qe_vllm.converters.hf_loading import (
    DEQUANTIZE_MODES,
    is_quantease_checkpoint,
    load_model,
    resolve_model,
)
from qe_vllm.converters.pipeline import pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EPILOG = """\
examples:
  qe-eval --model ./SmolLM2-135M-Instruct --data wiki.test.raw.txt --windows 4
  qe-eval --model ./smollm2-w4 --data wiki.test.raw.txt --windows 16 --output ppl.json

  # through a running server (started with --max-model-len >= seqlen + 1)
  qe-eval --server http://127.0.0.1:8000 --model ./smollm2-w4 --data wiki.test.raw.txt

accuracy with lm-evaluation-harness (pip install 'qe-vllm[eval]'; zero-shot unless --num-fewshot):
  # a local task (YAML + .jsonl, no network): the one the tests use
  qe-eval --model ./smollm2-w4 --tasks qe_easy_facts --include-path tests/data/lm_eval_tasks
  # lm-eval's own tasks by name (their datasets come from the Hugging Face Hub or its cache)
  qe-eval --model ./smollm2-w4 --tasks hellaswag,arc_easy --limit 200 --output acc.json
  # through a running server: --model is the served name, --tokenizer a local tokenizer dir
  qe-eval --server http://127.0.0.1:8000 --model smollm2-qe --tokenizer ./smollm2-w4 \\
      --tasks qe_easy_facts --include-path tests/data/lm_eval_tasks
"""
EVAL_EXTRA = "pip install 'qe-vllm[eval]'"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qe-eval",
        description="Perplexity of a Hugging Face causal LM or a QuantEase checkpoint on a text "
        "(non-overlapping windows, GPTQ protocol), or with --tasks its accuracy on "
        "lm-evaluation-harness tasks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a(
        "--model",
        required=True,
        help="model directory (original or converted by qe-convert), or a cached hub id",
    )
    a(
        "--data",
        help="perplexity: evaluation text: a .txt file (used as given), .json/.jsonl/.parquet, "
        "a directory of .txt files, or a datasets name NAME[:CONFIG][@SPLIT] "
        "(required unless --tasks is given)",
    )
    a("--seqlen", type=int, default=2048, help="tokens per window (default %(default)s)")
    a("--windows", type=int, default=None, help="evaluate only the first N windows (default: all)")
    a(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="compute dtype (default %(default)s)",
    )
    a("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default %(default)s)")
    a(
        "--dequantize",
        choices=DEQUANTIZE_MODES,
        default="once",
        help="QuantEase checkpoint: dequantize each linear once at load and keep the dense "
        "weight (fast, the memory of an unquantized model), or per-call (no dense weight "
        "resident, every forward pass dequantizes again); same numbers (default %(default)s)",
    )
    a(
        "--server",
        help="score through this OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of "
        "loading the model; --model is then the served model name, --dtype/--device/--dequantize "
        "are unused",
    )
    a(
        "--tokenizer",
        help="with --server: tokenizer directory or hub id (default: --model, which vLLM uses as "
        "the served name unless --served-model-name was given)",
    )
    a("--output", type=Path, help="also write the result as JSON to this file")
    t = p.add_argument_group("accuracy (lm-evaluation-harness; needs " + EVAL_EXTRA + ")")
    t.add_argument(
        "--tasks",
        help="comma-separated lm-eval task (or group) names, e.g. hellaswag,arc_easy; "
        "reports accuracy instead of perplexity",
    )
    t.add_argument(
        "--include-path",
        type=Path,
        help="directory of extra task YAMLs (lm-eval's TaskManager include_path); relative "
        "data_files in them are read from the YAML's own directory",
    )
    t.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    t.add_argument(
        "--num-fewshot",
        type=int,
        default=0,
        help="in-context examples per question (default %(default)s: zero-shot)",
    )
    t.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="requests per forward pass (local model) or per HTTP request (--server) "
        "(default %(default)s)",
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Perplexity needs ``--data``; accuracy refuses it (and ``--windows``) rather than
    ignoring it silently."""
    if args.tasks is None:
        if args.data is None:
            p.error("the following arguments are required: --data (or --tasks for accuracy)")
        for name in ("include_path", "limit"):
            if getattr(args, name) is not None:
                p.error(f"--{name.replace('_', '-')} only applies with --tasks")
    elif args.data is not None:
        p.error("--data is the perplexity text; with --tasks the tasks bring their own data")
    elif args.windows is not None:
        p.error("--windows is for perplexity; with --tasks use --limit")
    for name in ("limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_fewshot < 0:
        p.error(f"--num-fewshot must be at least 0, got {args.num_fewshot}")


@torch.no_grad()
def perplexity(
    model, tokens: torch.Tensor, seqlen: int, windows: int, device: torch.device
) -> tuple[float, int]:
    """``(ppl, scored tokens)`` over the first ``windows`` non-overlapping windows of ``tokens``."""
    nll, count = 0.0, 0
    for i in range(windows):
        ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += seqlen - 1
    return math.exp(nll / count), count


def server_perplexity(
    url: str, model: str, tokens: torch.Tensor, seqlen: int, windows: int, timeout: float = 600.0
) -> tuple[float, int]:
    """:func:`perplexity` through ``url``'s ``/v1/completions`` prompt logprobs.

    Each window goes as a list of token ids (no re-tokenization, no BOS added) with
    ``echo=True, logprobs=0, max_tokens=0``; the server returns the log-probability of
    every prompt token after the first, which is exactly what :func:`perplexity` scores.
    """
    nll, count = 0.0, 0
    for i in range(windows):
        ids = tokens[i * seqlen : (i + 1) * seqlen].tolist()
        payload = {"model": model, "prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0,
                   "temperature": 0.0}
        req = urllib.request.Request(
            url.rstrip("/") + "/v1/completions", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ValueError(f"server answered {e.code}: {e.read().decode(errors='replace')[:300]}") from None
        logprobs = body["choices"][0]["logprobs"]["token_logprobs"]
        if len(logprobs) != seqlen or any(lp is None for lp in logprobs[1:]):
            raise ValueError(
                f"server returned {len(logprobs)} prompt logprobs for a {seqlen}-token window; "
                "does it serve this model with --max-model-len >= seqlen?"
            )
        nll -= sum(logprobs[1:])
        count += seqlen - 1
    return math.exp(nll / count), count


def evaluate(
    model_name: str, data: str, seqlen: int, windows: int | None, dtype: str, device: str,
    server: str | None = None, tokenizer: str | None = None, dequantize: str = "once",
) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    if server is not None:
        tok_path = resolve_model(tokenizer or model_name)
        tokens = tokenize(AutoTokenizer.from_pretrained(tok_path), load_text(data))
        n = _window_count(tokens, data, seqlen, windows)
        ppl, scored = server_perplexity(server, model_name, tokens, seqlen, n)
        return {
            "model": model_name,
            "server": server,
            "tokenizer": str(tok_path),
            "data": data,
            "seqlen": seqlen,
            "windows": n,
            "tokens_scored": scored,
            "ppl": ppl,
            "seconds": round(time.perf_counter() - start, 2),
        }
    path = resolve_model(model_name)
    dev = pick_device(device)
    tokens = tokenize(AutoTokenizer.from_pretrained(path), load_text(data))
    n = _window_count(tokens, data, seqlen, windows)
    model = load_model(path, DTYPES[dtype], dev, dequantize=dequantize)
    ppl, scored = perplexity(model, tokens, seqlen, n, dev)
    quantized = is_quantease_checkpoint(path)
    return {
        "model": str(path),
        "quantized": quantized,
        **({"dequantize": dequantize} if quantized else {}),
        "data": data,
        "seqlen": seqlen,
        "windows": n,
        "tokens_scored": scored,
        "ppl": ppl,
        "dtype": dtype,
        "device": str(dev),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _window_count(tokens: torch.Tensor, data: str, seqlen: int, windows: int | None) -> int:
    available = tokens.numel() // seqlen
    if available == 0:
        raise ValueError(
            f"{data} has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    n = available if windows is None else min(windows, available)
    if n < 1:
        raise ValueError(f"--windows must be at least 1, got {windows}")
    return n


def parse_task_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; an empty list is an error, not "evaluate nothing"."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--tasks {text!r} names no task")
    return list(dict.fromkeys(names))  # lm-eval refuses duplicates; a repeated name means once


def import_lm_eval():
    """The ``lm_eval`` package, or a ValueError that says how to install it.

    Also checks the API extra's packages (``tenacity``...), which ``lm_eval`` itself
    imports only when the server path is taken, so both paths fail the same way up front.
    """
    try:
        import aiohttp  # noqa: F401  lm-eval[api]: the --server path
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        import tenacity  # noqa: F401
    except ModuleNotFoundError as e:
        raise ValueError(
            f"--tasks needs lm-evaluation-harness ({e.name} is not installed): {EVAL_EXTRA}"
        ) from None
    return lm_eval


def task_manager(include_path: Path | None, names: list[str]):
    """lm-eval's TaskManager over its built-in tasks plus ``include_path``.

    A missing directory is refused here: lm-eval would skip it silently and then report
    every task in it as unknown, which points at the wrong mistake. When every name is a
    plain task defined under ``include_path``, the built-in tasks are not indexed (that
    scan of ~15,000 YAMLs takes seconds); a group or tag may refer to built-in tasks by
    name, so any of those, or any name not found locally, gets the full index.
    """
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not include_path.is_dir():
        raise ValueError(f"--include-path {include_path} is not a directory")
    path = str(include_path.resolve())
    local = TaskManager(include_path=path, include_defaults=False)
    entries = [local.task_index.get(n) for n in names]
    if all(e is not None and e.kind.name in ("TASK", "PY_TASK") for e in entries):
        return local
    return TaskManager(include_path=path)


def _anchor_paths(files, base: Path):
    """``data_files`` (a path, a list, or a split -> paths dict) with relative paths that
    exist under ``base`` made absolute; anything else (URLs, globs, missing files) unchanged."""
    if isinstance(files, dict):
        return {k: _anchor_paths(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_anchor_paths(v, base) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute():
        candidate = base / files
        if candidate.exists():
            return str(candidate)
    return files


def task_specs(tm, names: list[str], include_path: Path | None) -> list[str | dict]:
    """What to hand ``TaskManager.load`` for each requested name; unknown names are refused.

    lm-eval resolves a task YAML's relative ``dataset_kwargs.data_files`` against the
    current directory (``datasets.load_dataset``), so a task directory would only work
    from one place. A task defined under ``include_path`` whose data files sit next to
    its YAML is therefore passed as its loaded config with those paths made absolute;
    every other name goes through unchanged (groups, built-in tasks, hub datasets).
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval uses for the YAML

    root = include_path.resolve() if include_path is not None else None
    specs: list[str | dict] = []
    for name in names:
        entry = tm.task_index.get(name)
        if entry is None:
            if Path(name).is_file():  # lm-eval also accepts a YAML path
                specs.append(name)
                continue
            raise ValueError(_unknown_task_message(tm, name, root))
        yaml_path = entry.yaml_path
        if root is None or yaml_path is None or not yaml_path.resolve().is_relative_to(root):
            specs.append(name)
            continue
        cfg = load_yaml(yaml_path, resolve_func=True)
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if cfg.get("task") != name or "group" in cfg or files is None:
            specs.append(name)
            continue
        anchored = _anchor_paths(files, yaml_path.resolve().parent)
        specs.append(
            {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": anchored}}
        )
    return specs


def _unknown_task_message(tm, name: str, root: Path | None) -> str:
    close = difflib.get_close_matches(name, tm.all_tasks, n=3)
    msg = f"unknown task {name!r}"
    if close:
        msg += f" (did you mean {', '.join(close)}?)"
    if root is not None:
        local = sorted(
            n for n, e in tm.task_index.items()
            if e.yaml_path is not None and e.yaml_path.resolve().is_relative_to(root)
        )
        msg += f"; --include-path {root} defines {', '.join(local) or 'no task'}"
    else:
        msg += "; local task YAMLs need --include-path DIR"
    return msg


def load_tasks(tm, names: list[str], specs: list[str | dict]) -> list:
    """Build every task (and read its dataset) before any model is loaded, so that an
    offline hub dataset or a broken YAML fails in seconds, as one line.

    Returns the top-level objects (a group stays a group, so lm-eval still aggregates it).
    Any exception here means "this task cannot be built", whatever lm-eval or ``datasets``
    raised, so it is reported as such with its type.
    """
    objects = []
    for name, spec in zip(names, specs):
        try:
            loaded = tm.load([spec])
        except Exception as e:  # noqa: BLE001 - see docstring
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ValueError(
                f"task {name!r} could not be loaded ({type(e).__name__}: {first})"
            ) from None
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objects.append(loaded["tasks"][name])
        else:  # a tag or a YAML path: its tasks, each on its own
            objects.extend(loaded["tasks"].values())
    return objects


def _served_models(url: str, timeout: float = 30.0) -> list[str]:
    """The names ``url`` serves (``/v1/models``): checked first so that a wrong URL or model
    name is one clear line before any task request is sent."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=timeout) as r:
            return [m["id"] for m in json.loads(r.read())["data"]]
    except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
        raise ValueError(f"server {url} did not list its models ({e})") from None


def server_lm(url: str, model_name: str, tokenizer: Path, batch_size: int):
    """lm-eval's ``local-completions`` model on ``url``: prompt logprobs via ``echo``.

    Requests are token ids tokenized locally with ``tokenizer`` (``tokenized_requests``), so
    the server scores exactly the tokens lm-eval split into context and continuation, the
    same split the local path scores; no BOS is added, as ``HFLM`` adds none for tokenizers
    that do not add one themselves.
    """
    from lm_eval.api.registry import get_model

    served = _served_models(url)
    if model_name not in served:
        raise ValueError(f"server {url} serves {', '.join(served)}, not {model_name!r} (--model)")
    return get_model("local-completions")(
        base_url=url.rstrip("/") + "/v1/completions",
        model=model_name,
        tokenizer=str(tokenizer),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        batch_size=batch_size,
        max_retries=1,  # a failing request (e.g. longer than --max-model-len) fails again
    )


def local_lm(
    path: Path, dtype: str, device: torch.device, batch_size: int, dequantize: str = "once"
):
    """``HFLM`` around the model :func:`load_model` builds, the one perplexity scores: a
    QuantEase checkpoint runs from its packed tensors (dequantized ``dequantize``)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    model = load_model(path, DTYPES[dtype], device, dequantize=dequantize)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def task_metrics(results: dict) -> dict[str, dict]:
    """``{task: {metric: value, metric_stderr: value, "samples": n}}`` from lm-eval's results.

    lm-eval keys metrics as ``"acc,none"`` (metric, filter); the default filter ``none`` is
    dropped, other filters stay (``"exact_match,strict-match"``). A stderr lm-eval did not
    compute (``"N/A"``) becomes ``None``. Groups are included under their own names.
    """
    out: dict[str, dict] = {}
    n_samples = results.get("n-samples", {})
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            row: dict = {}
            for key, value in metrics.items():
                if "," not in key:  # "alias", "sample_len"...
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt == "none" else key
                row[name] = None if value == "N/A" else value
            if task in n_samples:
                row["samples"] = n_samples[task].get("effective")
            out.setdefault(task, row)
    return out


def format_table(metrics: dict[str, dict]) -> str:
    """A plain text table: task, metric, value +- stderr (one row per metric)."""
    rows = [("task", "metric", "value", "± stderr")]
    for task, row in metrics.items():
        for name, value in row.items():
            if name.endswith("_stderr") or "_stderr," in name or name == "samples":
                continue
            if not isinstance(value, (int, float)):
                continue
            metric, _, filt = name.partition(",")
            stderr = row.get(f"{metric}_stderr" + (f",{filt}" if filt else ""))
            rows.append((
                task, name, f"{value:.4f}",
                f"± {stderr:.4f}" if isinstance(stderr, (int, float)) else "",
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + ("  " + r[3] if r[3] else "")
        for r in rows
    ).rstrip()


def evaluate_tasks(
    model_name: str, tasks: list[str], include_path: Path | None, limit: int | None,
    num_fewshot: int, batch_size: int, dtype: str, device: str,
    server: str | None = None, tokenizer: str | None = None, dequantize: str = "once",
) -> dict:
    """Accuracy of a local model or of ``server`` on lm-eval ``tasks`` (see module doc)."""
    lm_eval = import_lm_eval()
    start = time.perf_counter()
    tm = task_manager(include_path, tasks)
    specs = task_specs(tm, tasks, include_path)
    objects = load_tasks(tm, tasks, specs)
    if server is not None:
        tok_path = resolve_model(tokenizer or model_name)
        lm = server_lm(server, model_name, tok_path, batch_size)
        source = {"model": model_name, "server": server, "tokenizer": str(tok_path)}
    else:
        path = resolve_model(model_name)
        dev = pick_device(device)
        lm = local_lm(path, dtype, dev, batch_size, dequantize)
        quantized = is_quantease_checkpoint(path)
        source = {"model": str(path), "quantized": quantized,
                  **({"dequantize": dequantize} if quantized else {}),
                  "dtype": dtype, "device": str(dev)}
    results = lm_eval.simple_evaluate(
        model=lm, tasks=objects, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
        log_samples=False,
    )
    return {
        **source,
        "tasks": task_metrics(results),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval": lm_eval.__version__,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own progress and one-line errors
    if args.tasks is not None:
        return _main_tasks(args)
    try:
        result = evaluate(
            args.model, args.data, args.seqlen, args.windows, args.dtype, args.device,
            server=args.server, tokenizer=args.tokenizer, dequantize=args.dequantize,
        )
    except (ValueError, OSError) as e:
        print(f"qe-eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    if "server" in result:
        source = f"served by {result['server']}"
    else:
        source = f"{'quantease' if result['quantized'] else 'original'} model"
    print(
        f"perplexity {result['ppl']:.4f} ({result['windows']} x {result['seqlen']} tokens, "
        f"{source}, {result['seconds']} s)"
    )
    print(text)
    return 0


def _main_tasks(args: argparse.Namespace) -> int:
    try:
        result = evaluate_tasks(
            args.model, parse_task_list(args.tasks), args.include_path, args.limit,
            args.num_fewshot, args.batch_size, args.dtype, args.device,
            server=args.server, tokenizer=args.tokenizer, dequantize=args.dequantize,
        )
    except (ValueError, OSError) as e:
        print(f"qe-eval: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    if "server" in result:
        source = f"served by {result['server']}"
    else:
        source = f"{'quantease' if result['quantized'] else 'original'} model"
    print(
        f"accuracy, lm-evaluation-harness {result['lm_eval']} ({result['num_fewshot']}-shot, "
        f"{source}, {result['seconds']} s)"
    )
    print(format_table(result["tasks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
