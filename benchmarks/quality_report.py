"""The quality report (``quality.md``, ``quality.json``, ``quality.png``), built from stored results only.

Nothing here runs a model: the same stored files give the same bytes. Rows are
the planned settings with at least one stored result, aggregated over the seeds
present (mean, std, min–max, n); the tables are lists of :class:`Column` specs;
the targets (``quality_protocol.targets``) are evaluated by one generic loop
over :data:`CHECKS`, one small function per kind of target.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quality_protocol import (
    CALIB_LABEL,
    EVAL_SEQLEN,
    IN_DOMAIN,
    METHOD_LABEL,
    METHOD_OPTIONS,
    OUT_OF_DOMAIN,
    PEER,
    PEER_DIR,
    PEER_PPL_KEYS,
    REPO,
    SPEC_NSAMPLES,
    SPEC_SEQLEN_CPU,
    SPEC_SEQLEN_GPU,
    TIER_LABEL,
    Protocol,
    Setting,
    Target,
    plan,
    targets,
)
from quality_runner import ResultStore, write_json

NOTES = "quality_notes.md"  # hand-written notes on the v1 results, linked (no longer appended)
V1_REPORT = "quality-v1.md"

# ----------------------------------------------------------------------------- aggregation


def result_ppl(r: dict[str, Any]) -> float | None:
    """WikiText-2 test perplexity of one result: ``ppl`` as a number, or the first
    :data:`PEER_PPL_KEYS` entry of a ``ppl`` dict (the peer's files)."""
    p = r.get("ppl")
    if isinstance(p, dict):
        p = next((p[k] for k in PEER_PPL_KEYS if k in p), None)
    return float(p) if isinstance(p, (int, float)) else None


def from_peer(r: dict[str, Any]) -> dict[str, Any]:
    """A peer result with our field names: its timings are under ``seconds``.

    ``convert_seconds`` = llm-compressor's ``oneshot`` only (no model load, no saving)."""
    secs = r.get("seconds") or {}
    return {
        "convert_seconds": secs.get("quantize_oneshot"),
        "eval_seconds": secs.get("eval_wikitext2_test"),
        **r,
    }


def mean_of(results: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


@dataclass
class Agg:
    """One setting's results over the seeds present."""

    setting: Setting
    results: list[dict[str, Any]]

    @property
    def ppls(self) -> list[float]:
        return [p for p in map(result_ppl, self.results) if p is not None]

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.results if r.get("seed") is not None]

    @property
    def n(self) -> int:
        return len(self.ppls)

    @property
    def ppl(self) -> float | None:
        return statistics.fmean(self.ppls) if self.ppls else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.ppls) if self.n > 1 else None

    def __getitem__(self, key: str) -> float | None:
        """Mean over seeds of a numeric result field (``None`` when no result has it)."""
        return mean_of(self.results, key)

    def summary(self) -> dict[str, Any]:
        s = self.setting
        return {
            "key": s.key,
            "tier": s.tier,
            "method": s.method,
            "calib": s.calib,
            "seeds": self.seeds,
            "n": self.n,
            "ppl_mean": self.ppl,
            "ppl_std": self.std,
            "ppl_min": min(self.ppls, default=None),
            "ppl_max": max(self.ppls, default=None),
            "ppl_by_seed": self.ppls,
            "means": {
                k: self[k]
                for k in (
                    "convert_seconds",
                    "eval_seconds",
                    "effective_bits_per_weight",
                    "rel_error_mean",
                )
            },
        }


def aggregate(rows: list[Setting], store: ResultStore, proto: Protocol) -> dict[str, Agg]:
    """Planned settings with at least one stored result, by key, in plan order."""
    out = {}
    for s in rows:
        results = [from_peer(r) for r in store.load(s, proto)] if s.peer else store.load(s, proto)
        if results and (s.method == "sweep-timing" or any(map(result_ppl, results))):
            out[s.key] = Agg(s, results)
    return out


# ----------------------------------------------------------------------------- targets


@dataclass
class Check:
    subject: str
    baseline: str | None
    status: str  # met | missed | unmeasured
    result: str = ""
    margin: str = ""


class Unmeasured(Exception):
    """A number a check needs is not stored."""


def need(x: float | None, what: str) -> float:
    if x is None:
        raise Unmeasured(what)
    return x


def check_lower(s: Agg, b: Agg, ref: float | None, thr: float | None) -> tuple[bool, str, str]:
    q, g = need(s.ppl, s.setting.key), need(b.ppl, b.setting.key)
    d = g - q
    word = "below" if d > 0 else "above"
    return d > 0, f"{q:.3f} vs {g:.3f}", f"{abs(d):.3f} ppl ({100 * abs(d) / g:.2f}%) {word}"


def over_under(spare: float, text: str, limit: str) -> str:
    """``text`` (the size of ``spare``) under / over ``limit``."""
    return f"{text} {'under' if spare >= 0 else 'over'} {limit}"


def check_removes_excess(s: Agg, b: Agg, ref: float | None, thr: float | None):
    ref, q, g = need(ref, "reference"), need(s.ppl, s.setting.key), need(b.ppl, b.setting.key)
    result = f"ref {ref:.3f}, base {g:.3f}, QE {q:.3f}"
    if g <= ref:
        return False, result, "the baseline has no excess over the reference"
    share = (g - q) / (g - ref)
    d = 100 * (share - thr)
    margin = f"{abs(d):.1f} points {'above' if d >= 0 else 'short of'} {100 * thr:g}%"
    return share >= thr, f"{result}: removes {100 * share:.1f}%", margin


def check_ratio_to_reference(s: Agg, b: Agg | None, ref: float | None, thr: float | None):
    ref, q = need(ref, "reference"), need(s.ppl, s.setting.key)
    ratio, spare = q / ref, thr - q / ref
    margin = over_under(spare, f"{abs(spare):.3f}× ({abs(spare) * ref:.3f} ppl)", f"{thr:g}×")
    return ratio <= thr, f"{q:.3f} = {ratio:.3f}× ref", margin


def check_time_ratio(s: Agg, b: Agg, ref: float | None, thr: float | None):
    t = need(s["convert_seconds"], f"{s.setting.key} convert time")
    g = need(b["convert_seconds"], f"{b.setting.key} convert time")
    ratio = t / g
    return (
        ratio <= thr,
        f"{t:.0f} s / {g:.0f} s = {ratio:.2f}×",
        over_under(thr - ratio, f"{abs(thr - ratio):.2f}×", f"{thr:g}×"),
    )


CHECKS: dict[str, Callable[..., tuple[bool, str, str]]] = {
    "lower": check_lower,
    "removes_excess": check_removes_excess,
    "ratio_to_reference": check_ratio_to_reference,
    "time_ratio": check_time_ratio,
}


def run_check(
    t: Target, subject: str, baseline: str | None, agg: dict[str, Agg], ref: float | None
) -> Check:
    missing = [k for k in (subject, baseline) if k is not None and k not in agg]
    if missing:
        return Check(subject, baseline, "unmeasured", margin="missing: " + ", ".join(missing))
    try:
        ok, result, margin = CHECKS[t.kind](agg[subject], agg.get(baseline), ref, t.threshold)
    except Unmeasured as e:
        return Check(subject, baseline, "unmeasured", margin=f"missing: {e}")
    return Check(subject, baseline, "met" if ok else "missed", result, margin)


def target_status(checks: list[Check]) -> str:
    measured = [c for c in checks if c.status != "unmeasured"]
    missed = [c for c in measured if c.status == "missed"]
    open_ = len(checks) - len(measured)
    if not measured:
        return "UNMEASURED"
    if missed:
        return f"MISSED ({len(missed)} of {len(measured)} measured)"
    if open_:
        return f"MET WHERE MEASURED, NOT YET ALL ({open_} of {len(checks)} unmeasured)"
    return "MET"


def evaluate_targets(
    ts: list[Target], agg: dict[str, Agg], ref: float | None
) -> list[dict[str, Any]]:
    out = []
    for t in ts:
        checks = [run_check(t, a, b, agg, ref) for a, b in t.pairs]
        out.append(
            {
                "target": t.title,
                "kind": t.kind,
                "threshold": t.threshold,
                "status": target_status(checks),
                "checks": [vars(c) for c in checks],
            }
        )
    return out


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Any], str]


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(columns: tuple[Column, ...], items: list[Any]) -> list[str]:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(c.cell(it) for c in columns) + " |" for it in items]


def bits_cell(a: Agg) -> str:
    if not a.setting.quantized:
        return "16"
    bits = fmt(a["effective_bits_per_weight"], ".3f")
    ob = a["outlier_bits_per_weight"]
    return bits + (f" (o {ob:.3f})" if a.setting.outlier_fraction > 0 and ob is not None else "")


def result_columns(ref: float | None) -> tuple[Column, ...]:
    def q(a: Agg, text: str, other: str = "-") -> str:
        return text if a.setting.quantized else other

    return (
        Column("tier", lambda a: a.setting.tier),
        Column("method", lambda a: a.setting.method_label),
        Column("bits", lambda a: q(a, str(a.setting.bits), "16 (bf16)")),
        Column("group", lambda a: q(a, a.setting.group_label)),
        Column("outliers", lambda a: a.setting.outliers_label),
        Column(
            "calibration",
            lambda a: CALIB_LABEL[a.setting.calib].split(" (")[0] if a.setting.quantized else "-",
        ),
        Column("seeds", lambda a: ",".join(map(str, a.seeds)) or "-"),
        Column("ppl (mean)", lambda a: f"{a.ppl:.3f}"),
        Column("std", lambda a: fmt(a.std, ".3f") if a.n > 1 else "-"),
        Column("min–max", lambda a: f"{min(a.ppls):.3f}–{max(a.ppls):.3f}" if a.n > 1 else "-"),
        Column("×ref", lambda a: fmt(a.ppl / ref if ref else None, ".3f")),
        Column("bits/weight", bits_cell),
        Column("rel. err (mean)", lambda a: q(a, fmt(a["rel_error_mean"], ".4e"))),
        Column(
            "convert s",
            lambda a: q(
                a,
                fmt(a["convert_seconds"], ".0f")
                + (" (resumed)" if any(r.get("convert_resumed") for r in a.results) else ""),
            ),
        ),
        Column("eval s", lambda a: fmt(a["eval_seconds"], ".0f")),
    )


TIMING_COLUMNS = (
    Column("layer", lambda r: r["layer"]),
    Column("out×in", lambda r: f"{r['out_features']}×{r['in_features']}"),
    Column("GPTQ pass s", lambda r: f"{r['gptq_pass_s']:.3f}"),
    Column("QE sweep s", lambda r: f"{r['quantease_sweep_s']:.3f}"),
    Column("sweep/GPTQ", lambda r: f"**{r['sweep_over_gptq']:.2f}×**"),
    Column("full QE s", lambda r: f"{r['quantease_full_solve_s']:.3f}"),
    Column("full/GPTQ", lambda r: f"{r['quantease_full_over_gptq']:.2f}×"),
    Column("rel.err GPTQ", lambda r: f"{r['rel_error_gptq']:.4e}"),
    Column("+1 sweep", lambda r: f"{r['rel_error_gptq_plus_1_sweep']:.4e}"),
    Column("full QE", lambda r: f"{r['rel_error_quantease']:.4e}"),
)

CHECK_COLUMNS = (
    Column("setting", lambda c: f"`{c['subject']}`"),
    Column("against", lambda c: f"`{c['baseline']}`" if c["baseline"] else "reference"),
    Column("result", lambda c: c["result"] or "-"),
    Column("status", lambda c: c["status"].upper() if c["status"] == "missed" else c["status"]),
    Column("by how much", lambda c: c["margin"]),
)

OTHER_COLUMNS = (
    Column("file", lambda r: f"`{r['file']}`"),
    Column("ppl", lambda r: fmt(result_ppl(r), ".3f")),
    Column("bits/weight", lambda r: fmt(r.get("effective_bits_per_weight"), ".3f")),
    Column("convert s", lambda r: fmt(r.get("convert_seconds"), ".0f")),
)


# ----------------------------------------------------------------------------- sections


@dataclass
class Context:
    rows: list[Setting]
    agg: dict[str, Agg]
    store: ResultStore
    proto: Protocol
    ref: float | None
    targets: list[dict[str, Any]]
    machine: dict[str, Any]
    commands: list[str]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def options_line(method: str) -> str:
    s = Setting("", method, 3, 128, calib=IN_DOMAIN)
    opts = ", ".join(f"{k}={v}" for k, v in s.solver_options().items())
    return f"  * {METHOD_LABEL[method]} (file tag `h{s.tag()}`): {opts}"


def header(c: Context) -> list[str]:
    p = c.proto
    n_rows = sum(1 for s in c.rows if s.key in c.agg)
    regenerate = (
        f"python benchmarks/quality.py --report-only --nsamples {p.nsamples} --seqlen {p.seqlen} "
        f"--windows {p.windows}"
    )
    intro = (
        f"Generated by `benchmarks/quality.py` from the per-(setting, seed) results in "
        f"`{shown(c.store.quality)}/` and the peer's in `{shown(c.store.results / PEER_DIR)}/` "
        f"({n_rows} of {len(c.rows)} settings measured). Regenerate with `{regenerate}`. "
        f"Earlier results (pre-2026-12-03 solvers): [{V1_REPORT}]({V1_REPORT})."
    )
    return ["# Quality benchmark: SmolLM2-135M-Instruct, RTN / GPTQ / QuantEase", "", intro, ""]


def protocol_section(c: Context) -> list[str]:
    p, gpu = c.proto, c.machine.get("gpu")
    spec_len = SPEC_SEQLEN_GPU if gpu else SPEC_SEQLEN_CPU
    L = ["## Protocol", ""]
    L.append(
        "* Model: SmolLM2-135M-Instruct (bf16 HF checkpoint dequantized from the upstream Q4_1 GGUF; "
        'it is the "reference"), all 210 decoder linears quantized, `lm_head`/embeddings kept. '
        "Outliers stored as float16 CSR."
    )
    L.append(
        f"* Calibration: **{p.nsamples} samples of {p.seqlen} tokens** on "
        f"**{'GPU (' + gpu + ')' if gpu else 'CPU'}**, one result per seed (seed = which calibration "
        f"windows are drawn). In-domain = `wikitext-2-v1-valid.txt`; out-of-domain = `austen/*.txt` "
        f"except `prideprejudice.txt`. Never the test split."
    )
    if p.nsamples != SPEC_NSAMPLES or p.seqlen != spec_len:
        L.append(
            f"  * **Deviation from the spec:** the spec asks for {SPEC_NSAMPLES} samples of {spec_len} "
            f"tokens on {'GPU' if gpu else 'CPU'}; this run used {p.nsamples} x {p.seqlen}."
        )
    L.append(
        "* Solver options (besides bits, group, outliers, calibration; hashed into the file names):"
    )
    L += [options_line(m) for m in METHOD_OPTIONS]
    L.append(
        "  * llm-compressor GPTQ (peer): act-order (`weight`), asymmetric g64, llm-compressor's defaults "
        "otherwise, on our calibration windows, produced by `benchmarks/peer_llmcompressor.py` (same "
        "`--nsamples`/`--seqlen`/`--windows`); its `ppl` is read as a number or from the first of the keys "
        f"{', '.join(f'`{k}`' for k in PEER_PPL_KEYS)}; its convert s is llm-compressor's `oneshot` alone."
    )
    L.append(
        f"* Perplexity: `qe_vllm.cli.eval.evaluate` (the `qe-eval` code) on the converted checkpoint "
        f"**on disk**, WikiText-2 raw test, first **{p.windows}** non-overlapping windows of "
        f"{EVAL_SEQLEN} tokens ({p.windows * (EVAL_SEQLEN - 1)} scored tokens), float32 compute. "
        "ppl = mean over the seeds present; std and min–max over the same seeds."
    )
    L.append(
        "* Rel. err = mean over the 210 linears of ‖(W−Ŵ)X‖²/‖WX‖² on the calibration Σ, from the "
        "checkpoint provenance (n/a for RTN). Bits/weight = every stored byte of the quantized linears "
        "(codes, fp16 scales, zero points, outlier values, column indices, row pointers) / quantized "
        "weights; `(o …)` is the outlier share."
    )
    L.append(
        "* Convert = wall time of the whole conversion; eval = wall time of `evaluate` (means over "
        "seeds). The machine may be shared with other jobs, so times are indicative."
    )
    return L + [""]


def results_section(c: Context) -> list[str]:
    L = ["## Results", ""]
    if c.ref is not None:
        L += [f"Reference (unquantized) perplexity: **{c.ref:.3f}**.", ""]
    order = {s.key: i for i, s in enumerate(c.rows)}
    shown_rows = sorted(
        (a for a in c.agg.values() if a.setting.method != "sweep-timing"),
        key=lambda a: (a.setting.tier, order[a.setting.key]),
    )
    return L + (table(result_columns(c.ref), shown_rows) if shown_rows else ["None yet."]) + [""]


def timing_section(c: Context) -> list[str]:
    L = ["## Solver speed on real layers (3-bit g128, real Σ, textbook solvers)", ""]
    timing = c.agg.get("sweep-timing")
    if not timing:
        return L + ["Not measured yet.", ""]
    t = timing.results[0]
    cal, load = t["calibration"], t["load_average_1min"]
    L.append(
        f"Σ from {cal['nsamples']} in-domain windows of {cal['seqlen']} tokens through the unquantized "
        f"model; best of {t['repeats']} runs after a warm-up, torch threads: {t['threads']} (load average "
        f"{load['start']:.1f} -> {load['end']:.1f}). A sweep = the per-sweep GEMM plus the lazy-block "
        "column loop; the GPTQ pass includes its Cholesky."
    )
    return L + [""] + table(TIMING_COLUMNS, t["rows"]) + [""]


def targets_section(c: Context) -> list[str]:
    L = [
        "## Targets",
        "",
        (
            "WikiText-2 test perplexity, means over the seeds present; excess = ppl − reference; "
            "“removes X%” = (excess of the baseline − excess of QuantEase) / excess of the baseline."
        ),
        "",
    ]
    for t in c.targets:
        L += [f"### {t['target']}: {t['status']}", ""]
        L += (
            table(CHECK_COLUMNS, t["checks"])
            if t["checks"]
            else ["No pair of this target is planned."]
        )
        L.append("")
    return L


def pending_section(c: Context) -> list[str]:
    todo = [s for s in c.rows if s.key not in c.agg]
    L = [f"## Settings not yet measured ({len(todo)})", ""]
    for s in todo:
        if s.peer:
            f = c.store.path(s, c.proto, "SEED")
            L.append(
                f"* `{s.key}` ({TIER_LABEL[s.tier]}) — from `benchmarks/peer_llmcompressor.py`, "
                f"expected as `{shown(f)}`"
            )
            continue
        err = c.store.failure(s, c.proto)
        L.append(
            f"* `{s.key}` ({TIER_LABEL[s.tier]})"
            + (f" — last attempt failed: {err}" if err else "")
        )
    return L + (["None."] if not todo else []) + [""]


def unused_results(c: Context) -> list[dict[str, Any]]:
    used = {
        c.store.path(s, c.proto, seed)
        for s in c.rows
        if not s.peer
        for seed in c.store.seeds(s, c.proto)
    }
    return [{"file": f.name, **json.loads(f.read_text())} for f in c.store.unused(used)]


def other_section(c: Context) -> list[str]:
    others = unused_results(c)
    if not others:
        return []
    return (
        ["## Results under another protocol or other solver options (not used above)", ""]
        + table(OTHER_COLUMNS, others)
        + [""]
    )


def closing_section(c: Context) -> list[str]:
    m = c.machine
    L = ["## Commands and machine", ""]
    L += [f"    {cmd}" for cmd in c.commands or ["(none yet)"]]
    L += [
        "",
        (
            f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} "
            f"({m.get('torch_threads')} threads), transformers {m.get('transformers', '?')}, "
            f"GPU: {m.get('gpu') or 'none'}."
            if m
            else "Machine: no result stored yet."
        ),
        "",
    ]
    L.append(
        "Caveats: the reference weights were already 4-bit (Q4_1, group 32) upstream, so degradation is "
        "relative to them; C4/PTB are not available offline, so calibration is WikiText-2 v1 valid / "
        "Austen and only WikiText-2 raw test is evaluated (first windows only)."
    )
    if (c.store.results / NOTES).is_file():
        L += ["", f"Notes on the v1 results: [{NOTES}]({NOTES})."]
    return L


SECTIONS = (
    header,
    protocol_section,
    results_section,
    timing_section,
    targets_section,
    pending_section,
    other_section,
    closing_section,
)


# ----------------------------------------------------------------------------- outputs


def context(store: ResultStore, proto: Protocol) -> Context:
    rows = plan()
    agg = aggregate(rows, store, proto)
    ref = agg["reference"].ppl if "reference" in agg else None
    results = [r for a in agg.values() for r in a.results]
    commands = list(dict.fromkeys(r["command"] for r in results if r.get("command")))
    mach = next((r["machine"] for r in results if "machine" in r), {})
    return Context(
        rows, agg, store, proto, ref, evaluate_targets(targets(rows), agg, ref), mach, commands
    )


def summary(c: Context) -> dict[str, Any]:
    strip = ("rel_error_per_layer",)
    return {
        "protocol": {
            **vars(c.proto),
            "eval": f"WikiText-2 raw test, first {c.proto.windows} windows of {EVAL_SEQLEN} tokens",
        },
        "solver_options": {
            m: {"tag": Setting("", m, 3).tag(), **Setting("", m, 3).solver_options()}
            for m in METHOD_OPTIONS
        },
        "machine": c.machine,
        "commands": c.commands,
        "reference_ppl": c.ref,
        "targets": c.targets,
        "rows": [
            {
                **a.summary(),
                "results": [{k: v for k, v in r.items() if k not in strip} for r in a.results],
            }
            for a in c.agg.values()
        ],
        "not_measured": [s.key for s in c.rows if s.key not in c.agg],
        "failed": {
            s.key: e for s in c.rows if s.key not in c.agg and (e := c.store.failure(s, c.proto))
        },
        "other_files": [r["file"] for r in unused_results(c)],
    }


def write_report(store: ResultStore, proto: Protocol) -> Path:
    """Write ``quality.md``, ``quality.json`` and ``quality.png`` into the results directory."""
    c = context(store, proto)
    write_json(store.results / "quality.json", summary(c))
    lines = [line for section in SECTIONS for line in section(c)]
    out = store.results / "quality.md"
    out.write_text("\n".join(lines) + "\n")
    plot(c, store.results / "quality.png")
    return out


# ----------------------------------------------------------------------------- plot

COLOR = {"rtn": "tab:blue", "gptq": "tab:orange", "quantease": "tab:green", PEER: "tab:purple"}
MARKER = {"unstructured": "^", "columns": "D"}
PANELS = (
    (IN_DOMAIN, "calibrated in-domain (WikiText-2 valid)"),
    (OUT_OF_DOMAIN, "calibrated out-of-domain (Austen)"),
)


def group_name(gs: int) -> str:
    return "per-channel" if gs == -1 else f"g{gs}"


def panel_lines(c: Context, domain: str) -> dict[tuple[str, int], list[Agg]]:
    """Points of one panel (RTN, uncalibrated, in both), one line per (variant, group size)."""
    lines: dict[tuple[str, int], list[Agg]] = {}
    for a in c.agg.values():
        s = a.setting
        if s.quantized and s.calib in (domain, None) and a["effective_bits_per_weight"] is not None:
            lines.setdefault((s.method_label, s.group_size), []).append(a)
    return lines


def draw_line(ax, label: str, gs: int, pts: list[Agg]) -> None:
    pts.sort(key=lambda a: a["effective_bits_per_weight"])
    s = pts[0].setting
    col = COLOR.get(s.method, "tab:gray")
    ys = [a.ppl for a in pts]
    err = [[y - min(a.ppls) for a, y in zip(pts, ys)], [max(a.ppls) - y for a, y in zip(pts, ys)]]
    ax.errorbar(
        [a["effective_bits_per_weight"] for a in pts],
        ys,
        yerr=err,
        capsize=3,
        marker=MARKER.get(s.outlier_structure, "o") if s.outlier_fraction > 0 else "o",
        linestyle=("--" if gs == 64 else "-") if len(pts) > 1 else "none",
        color=col,
        markerfacecolor=col if gs != -1 else "none",
        markersize=7,
        label=f"{label} {group_name(gs)}",
    )


def plot(c: Context, path: Path) -> None:
    """Mean perplexity (bars: min–max over seeds) against effective bits/weight, one panel per domain.

    Colour = solver, marker = outlier variant, hollow = per channel, dashed = g64.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 8), sharey=True)
    for ax, (domain, title) in zip(axes, PANELS):
        for (label, gs), pts in panel_lines(c, domain).items():
            draw_line(ax, label, gs, pts)
        if c.ref is not None:
            ax.axhline(
                c.ref, color="black", linestyle="--", linewidth=1, label=f"reference {c.ref:.2f}"
            )
        ax.set_yscale("log")
        ax.set_xlabel("effective bits / weight (incl. scales, zeros, outliers)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:  # below the panel: above it would hide the 2-bit points
            ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    axes[0].set_ylabel("WikiText-2 test perplexity (log), mean over seeds")
    fig.suptitle("SmolLM2-135M-Instruct: perplexity vs storage")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
