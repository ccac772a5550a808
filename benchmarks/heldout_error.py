"""Does a solver's lower calibration error carry over to text it was not calibrated on?

For a few SmolLM2 linears, Σ = Σ xxᵀ is collected from three sources through the
*unquantized* model: Austen (out of domain), WikiText-2 valid (in domain; the quality
benchmark's calibration) and WikiText-2 test (held out: what perplexity is measured on).
Each solver is fitted on one calibration Σ and scored, as ‖(W−Ŵ)X‖²/‖WX‖², on all three.
A solver that wins on its calibration Σ but loses on the held-out one overfits the
calibration set: the quality benchmark's QuantEase-vs-GPTQ gap out of domain is the
motivating case (``benchmarks/results/quality.md``).

::

    python benchmarks/heldout_error.py                 # -> results/heldout_error.{md,json}
    python benchmarks/heldout_error.py --nsamples 128  # the spec's calibration size
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from qe_vllm.converters.calibration import load_text, random_windows, tokenize
from qe_vllm.converters.grid import fit, quantize
from qe_vllm.converters.objective import Quadratic, layer_error
from qe_vllm.converters.options import ConvertOptions
from qe_vllm.converters.quantease import CoordinateDescent, coordinate_descent, initial_point
from qe_vllm.converters.result import QuantResult
from qe_vllm.converters.solvers import solve
from qe_vllm.converters.statistics import model_sigmas

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = ("model.layers.5.self_attn.q_proj", "model.layers.5.mlp.down_proj", "model.layers.20.mlp.down_proj")


def quantease_all_sweeps(w: torch.Tensor, sigma: torch.Tensor, opts: ConvertOptions) -> QuantResult:
    """``quantease`` without its early stop (``tol=0``): all ``opts.iters`` sweeps while ``f`` falls."""
    w = w.float()
    problem = Quadratic.of(sigma, opts.propagation).to(w.device, torch.float64)
    grid = fit(w, opts.spec, mse=opts.mse_grid)
    cd = CoordinateDescent(w, problem.regularized(opts.shrink, opts.cd_damp), opts.spec, grid)
    v, _ = coordinate_descent(cd, initial_point(w, problem, opts, grid), iters=opts.iters, tol=0.0)
    return QuantResult(quantize(v.float(), *grid, opts.spec), *grid)


# each solver gets the textbook QuantEase options of the run (``main``) and changes what it names
SOLVERS = {
    "gptq": lambda w, s, o: solve(w, s, replace(o, method="gptq")),
    "quantease 5 sweeps": lambda w, s, o: solve(w, s, replace(o, iters=5)),
    "quantease 5 sweeps, damp 0.01": lambda w, s, o: solve(w, s, replace(o, iters=5, cd_damp=0.01)),
    "quantease 20 sweeps": lambda w, s, o: quantease_all_sweeps(w, s, replace(o, iters=20)),
}


def sources(data: Path) -> dict[str, str]:
    austen = sorted(p for p in (data / "austen").glob("*.txt") if p.name != "prideprejudice.txt")
    return {
        "austen": "".join(p.read_text() for p in austen),
        "wiki-valid": load_text(str(data / "wikitext-2-v1-valid.txt")),
        "wiki-test": load_text(str(data / "wikitext-2-raw-test.txt")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / ".cache/models/SmolLM2-135M-Instruct")
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("QE_DATA_DIR", ROOT.parent / "shared" / "data")),
        help="text data directory (default: $QE_DATA_DIR, else %(default)s)",
    )
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows per source")
    ap.add_argument("--test-windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    sigma = {}
    for name, text in sources(a.data).items():
        n = a.test_windows if name == "wiki-test" else a.nsamples
        sigma[name] = model_sigmas(model, LAYERS, random_windows(tokenize(tok, text), n, a.seqlen, 0, name))
    opts = ConvertOptions(
        method="quantease", bits=a.bits, group_size=a.group_size, true_sequential=False,
        propagation=0.0, shrink=0.0, cd_damp=0.0,
    )
    rows = []
    for layer in LAYERS:
        w = model.get_submodule(layer).weight.detach().float()
        for calib in ("austen", "wiki-valid"):
            for solver, fn in SOLVERS.items():
                t0 = time.perf_counter()
                w_hat = fn(w, sigma[calib][layer], opts).weight(a.group_size)
                errors = {src: layer_error(w, w_hat, s[layer]) for src, s in sigma.items()}
                rows.append({"layer": layer, "calibration": calib, "solver": solver,
                             "seconds": round(time.perf_counter() - t0, 2), "error": errors})
                print(f"{layer:32s} {calib:10s} {solver:30s} " + "  ".join(
                    f"{src} {e:.4e}" for src, e in errors.items()), flush=True)
    write(rows, vars(a))


def write(rows: list[dict], args: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    args = {k: str(v) for k, v in args.items()}
    (RESULTS / "heldout_error.json").write_text(json.dumps({"args": args, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Calibration vs held-out reconstruction error (SmolLM2 layers)",
        "",
        "`python benchmarks/heldout_error.py` ("
        + ", ".join(f"{k}={v}" for k, v in args.items() if k not in ("model", "data"))
        + "). Relative error ‖(W−Ŵ)X‖²/‖WX‖²; "
        "Σ from the unquantized model; **bold** = the Σ the solver was fitted on; wiki-test is "
        "what perplexity is measured on.",
        "",
        "| layer | calibrated on | solver | austen | wiki-valid | wiki-test |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"**{e:.4e}**" if src == r["calibration"] else f"{e:.4e}" for src, e in r["error"].items()]
        lines.append(f"| {r['layer']} | {r['calibration']} | {r['solver']} | " + " | ".join(cells) + " |")
    (RESULTS / "heldout_error.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
