"""End-to-end demo on the default model: quantize SmolLM2 with QuantEase, serve it with vLLM.

Phases (each timed):

1. default model — ``<cache>/models/SmolLM2-135M-Instruct`` (bf16), prepared by
   ``serving/setup.sh``; prepared here if missing.
2. convert — ``qe-convert --model <model> --output <cache>/ckpt/smollm2-quantease-w4g128-o1 --bits 4
   --group-size 128 --outlier-fraction 0.01 --nsamples 16 --seqlen 512``: QuantEase (the
   default method) calibrated on the corpus bundled with the package, on 16 windows so the
   demo fits in a few minutes on 2 CPU cores (the converter's own default is 128 x 2048);
   skipped when the output already holds a config.json with
   ``quantization_config.quant_method == "quantease"``. Written to a temporary directory and
   renamed, so an interrupted run is redone.
2b. perplexity — ``qe-eval`` of the model before and after, on the first 4 x 512 tokens of
   this repository's README.md (our own text: neither calibration nor benchmark data).
3. serve — ``vllm serve <ckpt> --quantization quantease --max-model-len 1024 --enforce-eager``
   on a free 127.0.0.1 port (``serving/server.py``).
4. one greedy completion ("The capital of France is", 16 tokens) and one chat request with
   the ``openai`` client; both answers printed.
5. stop the server (no process left behind).

Usage::

    .venv/bin/python serving/demo.py                 # the README's main job
    .venv/bin/python serving/demo.py --no-quant      # serve the bf16 model (no qe-convert)
    .venv/bin/python serving/demo.py --compile       # vLLM's default torch.compile path

Takes about 3-4 minutes on 2 CPU cores (conversion, two perplexities, ~1 min vLLM start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    from serving import paths
    from serving.server import VllmServer
except ImportError:  # run as `python serving/demo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from serving import paths
    from serving.server import VllmServer

PROMPT = "The capital of France is"
EVAL_TEXT = Path(__file__).resolve().parent.parent / "README.md"
EVAL_ARGS = ("--seqlen", "512", "--windows", "4", "--device", "cpu")
CHAT = "What is the capital of France?"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def console_script(name: str, module: str) -> list[str]:
    """``name`` of this venv, else on PATH, else its module run by this interpreter."""
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    if shutil.which(name):
        return [shutil.which(name)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def perplexity(model: Path, out: Path) -> float:
    """``qe-eval`` of ``model`` (original or converted) on :data:`EVAL_TEXT`."""
    cmd = [*console_script("qe-eval", "qe_vllm.cli.eval"), "--model", str(model),
           "--data", str(EVAL_TEXT), *EVAL_ARGS, "--output", str(out)]
    subprocess.run(cmd, check=True, timeout=300, stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["ppl"])


def ckpt_name(args: argparse.Namespace) -> str:
    """The cache name of the checkpoint ``args`` describe, e.g. ``smollm2-quantease-w4g128-o1``.

    Every setting ``made_like`` checks is in the name, so the demo (QuantEase) and the soak
    (RTN) keep a checkpoint each instead of reconverting over one another.
    """
    pct = f"{args.outlier_fraction * 100:g}".replace(".", "p")
    return f"smollm2-{args.method}-w{args.bits}g{args.group_size}-o{pct}"


def made_like(ckpt: Path, args: argparse.Namespace) -> bool:
    """Whether ``ckpt``'s provenance records this demo's method and settings (else: reconvert)."""
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    options = (qc.get("provenance") or {}).get("options") or {}
    want = {"method": args.method, "bits": args.bits, "group_size": args.group_size,
            "outlier_fraction": args.outlier_fraction}
    if args.method != "rtn":  # and calibrated on the bundled corpus, as the demo does
        want.update(nsamples=args.nsamples, seqlen=args.seqlen)
        if not str(options.get("calib_data")).startswith("bundled corpus"):
            return False
    return all(options.get(k) == v for k, v in want.items())


def convert(model: Path, out: Path, args: argparse.Namespace) -> str:
    if paths.quantease_ckpt_is_complete(out) and made_like(out, args) and not args.reconvert:
        return f"already converted: {out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for d in paths.remove_stale_tmp(out):
        log(f"removed leftover of an interrupted conversion: {d}")
    tmp = paths.tmp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [*console_script("qe-convert", "qe_vllm.cli.convert"), "--model", str(model),
           "--output", str(tmp), "--bits", str(args.bits), "--group-size", str(args.group_size),
           "--method", args.method, "--outlier-fraction", str(args.outlier_fraction)]
    if args.method != "rtn":
        cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    log("$ " + " ".join(cmd).replace(str(tmp), str(out)) + f"   (written to {tmp.name} first)")
    try:
        env = {**os.environ, "TQDM_DISABLE": "1"}  # no per-layer progress bars in the demo
        subprocess.run(cmd, check=True, timeout=args.convert_timeout, env=env)
        if not paths.quantease_ckpt_is_complete(tmp):
            raise SystemExit(f"qe-convert finished but {tmp}/config.json has no "
                             "quantization_config.quant_method == 'quantease'")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"converted -> {out}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=paths.default_model_dir())
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="quantized checkpoint dir (default: <cache>/ckpt/smollm2-<method>-w<bits>g<group>-o<pct>)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", default="quantease", choices=("quantease", "gptq", "rtn"))
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--outlier-fraction", type=float, default=0.01)
    ap.add_argument("--reconvert", action="store_true", help="convert even if the ckpt exists")
    ap.add_argument("--no-quant", action="store_true",
                    help="serve the bf16 model without conversion (no --quantization)")
    ap.add_argument("--compile", action="store_true",
                    help="let vLLM torch.compile the model (slower start; default --enforce-eager)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--convert-timeout", type=float, default=600)
    ap.add_argument("--startup-timeout", type=float, default=480)
    ap.add_argument("--summary-json", type=Path, default=None, help="write results here")
    ap.add_argument("vllm_args", nargs="*", help="extra `vllm serve` arguments (after --)")
    args = ap.parse_args(argv)

    t_all = time.monotonic()
    timings: dict[str, float] = {}
    summary: dict = {"timings_s": timings}

    # 1. default model
    t = time.monotonic()
    model = args.model.expanduser().resolve()
    if paths.model_is_complete(model):
        log(f"model: {model} (prepared)")
    elif model == paths.default_model_dir():
        log("default model missing: running serving/prepare_model.py")
        subprocess.run([sys.executable, str(Path(__file__).with_name("prepare_model.py"))],
                       check=True)
    elif not (model / "config.json").is_file():
        raise SystemExit(f"{model} has no config.json")
    timings["model"] = time.monotonic() - t

    # 2. convert
    t = time.monotonic()
    if args.no_quant:
        ckpt, quant_args = model, []
        log("--no-quant: serving the bf16 model")
    else:
        ckpt = (args.ckpt or paths.ckpt_dir(ckpt_name(args))).expanduser().resolve()
        log(convert(model, ckpt, args))
        quant_args = ["--quantization", "quantease"]
    timings["convert"] = time.monotonic() - t

    # 2b. perplexity before and after
    if not args.no_quant:
        t = time.monotonic()
        scratch = paths.ckpt_dir(".demo-eval")
        scratch.mkdir(parents=True, exist_ok=True)
        before, after = (perplexity(m, scratch / f"{tag}.json") for m, tag in ((model, "before"), (ckpt, "after")))
        summary["perplexity"] = {"text": EVAL_TEXT.name, "before": before, "after": after}
        log(f"perplexity on the first {EVAL_ARGS[3]} x {EVAL_ARGS[1]} tokens of {EVAL_TEXT.name}: "
            f"{before:.2f} before, {after:.2f} after quantization")
        timings["perplexity"] = time.monotonic() - t

    vllm_args = [*quant_args, "--max-model-len", str(args.max_model_len),
                 "--served-model-name", ckpt.name]
    if not args.compile:
        vllm_args.append("--enforce-eager")
    if not all((ckpt / f).is_file() for f in TOKENIZER_FILES):
        log(f"no tokenizer files in {ckpt}: using the tokenizer of {model}")
        vllm_args += ["--tokenizer", str(model)]
    if not (ckpt / "generation_config.json").is_file():
        log(f"note: {ckpt} has no generation_config.json")
    vllm_args += args.vllm_args

    # 3.-5. serve, query, stop
    t = time.monotonic()
    srv = VllmServer(ckpt, *vllm_args, startup_timeout=args.startup_timeout, max_lifetime=900)
    with srv:
        timings["serve_startup"] = time.monotonic() - t
        summary["rss_gib"] = round(srv.rss_bytes() / 2**30, 3)
        summary["pss_gib"] = round(srv.pss_bytes() / 2**30, 3)
        print(srv.memory_report(), flush=True)
        client = srv.openai_client()

        t = time.monotonic()
        comp = client.completions.create(model=srv.model_name, prompt=PROMPT,
                                         max_tokens=args.max_tokens, temperature=0.0)
        timings["completion"] = time.monotonic() - t
        summary["completion"] = comp.choices[0].text
        log(f"completion ({timings['completion']:.2f} s): {PROMPT!r} -> {comp.choices[0].text!r}")

        t = time.monotonic()
        chat = client.chat.completions.create(
            model=srv.model_name, messages=[{"role": "user", "content": CHAT}],
            max_tokens=32, temperature=0.0)
        timings["chat"] = time.monotonic() - t
        summary["chat"] = chat.choices[0].message.content
        log(f"chat ({timings['chat']:.2f} s): {CHAT!r} -> {chat.choices[0].message.content!r}")
        srv.rss_bytes()  # one more sample for the peak
        summary["peak_rss_gib"] = round(srv.peak_rss_bytes / 2**30, 3)
        t = time.monotonic()
    timings["stop"] = time.monotonic() - t
    timings["total"] = time.monotonic() - t_all

    summary.update(model=str(model), ckpt=str(ckpt), vllm_args=vllm_args,
                   log=str(srv.log_path), startup_s=srv.startup_seconds)
    print("\n[demo] timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"[demo] server RSS after start-up {summary['rss_gib']:.2f} GiB "
          f"(PSS {summary['pss_gib']:.2f} GiB, peak RSS {summary['peak_rss_gib']:.2f} GiB); "
          f"log {srv.log_path}")
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
