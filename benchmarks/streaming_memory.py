"""Peak memory and time of a streaming conversion of a synthetic ~1.5B-parameter Llama.

    python benchmarks/streaming_memory.py [--layers 30] [--method rtn] [--nsamples 8] [--seqlen 256]
                                          [--work /tmp/qe-streaming] [--json benchmarks/results/streaming_memory.json]

The model is random (quality is not the point): Llama geometry (hidden 2048, MLP 5632,
16 heads, 4 KV heads, SmolLM2's tokenizer and vocabulary, untied head), bf16 weights
written in ~1 GB shards one shard at a time, so building it never holds the model either.
``qe-convert`` then runs in a child process, and its peak RSS is read from ``wait4``'s
``ru_maxrss`` (the child alone). The target of converters/source.py's design is
peak RSS <= 0.35 x the model's bf16 size + the calibration activations (float32
``[nsamples, seqlen, hidden]``, twice with error propagation: the quantized and the
full-precision stream). Prints a table and writes JSON with the machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
SHARD_BYTES = 10**9


def build_model(out: Path, layers: int) -> int:
    """Write the synthetic model at ``out``; returns its size in bytes (bf16)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with init_empty_weights():
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    out.mkdir(parents=True)
    cfg.save_pretrained(out)
    for f in TOKENIZER.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix in (".jinja", ".txt"):
            shutil.copyfile(f, out / f.name)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for name in shapes:
        nbytes = 2 * shapes[name].numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                torch.randn(shapes[n], generator=gen).mul_(0.02)).to(torch.bfloat16)
            for n in names
        }
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    total = sum(2 * s.numel() for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total


def convert(model: Path, output: Path, args: argparse.Namespace) -> tuple[float, int, list[str]]:
    """Run qe-convert in a child; (seconds, peak RSS bytes of the child, command)."""
    cmd = [str(Path(sys.executable).with_name("qe-convert")), "--model", str(model), "--output", str(output),
           "--method", args.method, "--bits", "4", "--group-size", "128", "--device", "cpu",
           "--max-shard-size", args.max_shard_size]
    if args.method != "rtn":
        cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"qe-convert failed ({status}): {shlex.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024, cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30, help="decoder blocks (30: about 1.55 B parameters)")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq", "quantease"))
    p.add_argument("--max-shard-size", default="2GiB", help="qe-convert --max-shard-size (default %(default)s)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("/tmp/qe-streaming"), help="scratch (deleted first)")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "streaming_memory.json")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    model_bytes = build_model(args.work / "model", args.layers)
    seconds, peak, cmd = convert(args.work / "model", args.work / "out", args)
    from qe_vllm.converters.options import ConvertOptions

    opts = ConvertOptions(method=args.method)
    copies = 0 if not opts.calibrated else (2 if opts.propagation > 0 else 1)
    acts = copies * args.nsamples * args.seqlen * 2048 * 4
    budget = 0.35 * model_bytes + acts
    row = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}",
        "command": shlex.join([sys.executable, *sys.argv]),
        "converter_command": shlex.join(cmd),
        "layers": args.layers, "method": args.method, "max_shard_size": args.max_shard_size, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "model_bf16_bytes": model_bytes, "activation_bytes": acts, "peak_rss_bytes": peak,
        "seconds": round(seconds, 1), "budget_bytes": int(budget), "peak_over_model": round(peak / model_bytes, 3),
        "meets_target": peak <= budget,
    }
    print("| method | output shards | model (bf16) | activations | peak RSS | peak / model | budget (0.35x + acts) | target | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.method} | {args.max_shard_size} | {model_bytes / 1e9:.2f} GB | {acts / 1e6:.0f} MB | {peak / 1e9:.2f} GB | {peak / model_bytes:.3f} "
          f"| {budget / 1e9:.2f} GB | {'met' if row['meets_target'] else 'MISSED'} | {seconds:.0f} s |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(args.json.read_text()) if args.json.exists() else []
    args.json.write_text(json.dumps([*runs, row], indent=2) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
