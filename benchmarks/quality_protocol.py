"""What the quality benchmark measures: settings, the plan, calibration sources, targets.

Everything here is data or pure functions of data (no model is loaded); the
runner (``quality_runner.py``) executes a :class:`Setting`, the report
(``quality_report.py``) reads the stored results back and evaluates
:func:`targets` generically.

Solver options. "GPTQ" rows are *textbook* GPTQ (:data:`TEXTBOOK_GPTQ`:
layer-wise target, blocks solved in one group, no act-order); "QuantEase" rows
use ``ConvertOptions``' defaults for every solver option, whatever they are at
run time; "RTN" rows are ``method="rtn"``. A setting overrides only the bit
width, group size, outliers and calibration. The solver options are hashed
into the result file's name (:meth:`Setting.tag`), so a change of defaults
never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_SCRATCH = Path("/tmp/qe-quality")

EVAL_FILE = "wikitext-2-raw-test.txt"  # only ever evaluated on
EVAL_SEQLEN = 2048
# The spec's calibration: 128 windows of 512 tokens on CPU, of 2048 tokens on a GPU.
SPEC_NSAMPLES, SPEC_SEQLEN_CPU, SPEC_SEQLEN_GPU = 128, 512, 2048
TIMING_SEED = 0  # the sweep-timing Σ is not seeded: one calibration draw

IN_DOMAIN, OUT_OF_DOMAIN = "wiki2-valid", "austen"
CALIB_LABEL = {
    IN_DOMAIN: "in-domain (WikiText-2 v1 valid)",
    OUT_OF_DOMAIN: "out-of-domain (Austen, 4 novels, no P&P)",
    None: "none",
}
TIER_LABEL = {
    "a": "(a) reference and solver speed",
    "b": "(b) in-domain 3-bit g128",
    "c": "(c) in-domain 4-bit g128",
    "d": "(d) out-of-domain (Austen) g128",
    "e": "(e) 2-bit g128 + 2% outliers",
    "f": "(f) per-channel and the rest",
    "g": "(g) 3-bit g64, against the llm-compressor peer",
}

# ----------------------------------------------------------------------------- solver options

# Overrides of ConvertOptions' defaults per method (QuantEase: none, the defaults are the method).
TEXTBOOK_GPTQ: dict[str, Any] = {
    "true_sequential": False,
    "propagation": 0.0,
    "shrink": 0.0,
    "cd_damp": 0.0,
    "act_order": False,
    "mse_grid": False,
}
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "rtn": {"mse_grid": False},
    "gptq": TEXTBOOK_GPTQ,
    "quantease": {},
}
# Fields a setting or its calibration sets: in the key / stem already, not in the tag.
SETTING_FIELDS = ("method", "bits", "group_size", "outlier_fraction", "outlier_structure")
CALIB_FIELDS = ("calib_data", "calib_format", "nsamples", "seqlen", "seed")
# rtn() reads only the grid options (converters/rtn.py): its tag ignores the solvers' defaults.
RTN_READS = ("sym", "mse_grid")

# ----------------------------------------------------------------------------- the peer

PEER = "llmcompressor-gptq"  # results written by benchmarks/peer_llmcompressor.py
PEER_DIR = "peer"  # under the results directory
PEER_CALIB = {IN_DOMAIN: "wiki", OUT_OF_DOMAIN: "austen"}  # its --calib names, in its file names
# The peer's file holds "ppl" as a float or as a dict by eval text; the first key found is read
# (peer_llmcompressor.py writes "wikitext2_test" and "prideprejudice").
PEER_PPL_KEYS = (
    "wikitext2_test",
    "wikitext-2-raw-test",
    "wikitext-2-raw-test.txt",
    "wikitext2-test",
    "wikitext-2-test",
    "wikitext2",
    "wikitext-2",
    "wiki2-test",
)

METHOD_LABEL = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "quantease": "QuantEase",
    PEER: "llm-compressor GPTQ (peer)",
}


@dataclass(frozen=True)
class Protocol:
    """What, besides the setting and the seed, determines a result."""

    nsamples: int
    seqlen: int
    windows: int
    timing_nsamples: int = 8


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark."""

    tier: str
    method: str  # reference | sweep-timing | rtn | gptq | quantease | PEER
    bits: int = 16
    group_size: int = 128
    outlier_fraction: float = 0.0
    outlier_structure: str = "unstructured"
    calib: str | None = None

    @property
    def peer(self) -> bool:
        """Produced by another script; the runner never runs it."""
        return self.method == PEER

    @property
    def calibrated(self) -> bool:
        return self.method in ("gptq", "quantease", PEER)

    @property
    def seeded(self) -> bool:
        return self.calibrated

    @property
    def quantized(self) -> bool:
        return self.method in ("rtn", "gptq", "quantease", PEER)

    @property
    def key(self) -> str:
        if not self.quantized:
            return self.method
        parts = [
            self.method,
            f"w{self.bits}",
            "gch" if self.group_size == -1 else f"g{self.group_size}",
        ]
        if self.outlier_fraction > 0:
            kind = "c" if self.outlier_structure == "columns" else "u"
            parts.append(f"o{100 * self.outlier_fraction:g}{kind}")
        if self.calib:
            parts.append(self.calib)
        return "-".join(parts)

    def twin(self, method: str) -> Setting:
        """The same setting solved by ``method`` (RTN takes no calibration)."""
        calib = None if method == "rtn" else self.calib
        return Setting(
            self.tier,
            method,
            self.bits,
            self.group_size,
            self.outlier_fraction,
            self.outlier_structure,
            calib,
        )

    @property
    def group_label(self) -> str:
        return "channel" if self.group_size == -1 else str(self.group_size)

    @property
    def outliers_label(self) -> str:
        if self.outlier_fraction <= 0:
            return "-"
        kind = "columns" if self.outlier_structure == "columns" else "unstr."
        return f"{100 * self.outlier_fraction:g}% {kind}"

    @property
    def method_label(self) -> str:
        name = METHOD_LABEL.get(self.method, self.method)
        if self.outlier_fraction > 0:
            kind = "col" if self.outlier_structure == "columns" else "unstr"
            name += f" +{100 * self.outlier_fraction:g}% {kind}"
        return name

    # ------------------------------------------------------------------------- options and names

    def options(self, calib_data: str | None = None, proto: Protocol | None = None, seed: int = 0):
        """The ``ConvertOptions`` this setting converts with (rtn / gptq / quantease only)."""
        from qe_vllm.converters.options import ConvertOptions

        calib: dict[str, Any] = {}
        if self.calibrated and proto is not None:
            calib = {
                "calib_data": calib_data,
                "nsamples": proto.nsamples,
                "seqlen": proto.seqlen,
                "seed": seed,
            }
        return ConvertOptions(
            method=self.method,
            bits=self.bits,
            group_size=self.group_size,
            outlier_fraction=self.outlier_fraction,
            outlier_structure=self.outlier_structure,
            **METHOD_OPTIONS[self.method],
            **calib,
        )

    def solver_options(self) -> dict[str, Any]:
        """The options the tag hashes: everything but the setting and its calibration."""
        opts = asdict(self.options())
        keep = (
            RTN_READS
            if self.method == "rtn"
            else [k for k in opts if k not in SETTING_FIELDS + CALIB_FIELDS]
        )
        return {k: opts[k] for k in sorted(keep)}

    def tag(self) -> str | None:
        """First 8 hex digits of sha1 of the sorted JSON of :meth:`solver_options`."""
        if self.method not in METHOD_OPTIONS:
            return None
        blob = json.dumps(self.solver_options(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:8]

    def stem(self, proto: Protocol, seed: int | str | None = None) -> str:
        """The result file's name without ``.json``; ``seed`` may be ``"*"`` for a glob."""
        if self.method == "sweep-timing":
            return f"{self.key}__n{proto.timing_nsamples}x{proto.seqlen}"
        if self.peer:  # the name benchmarks/peer_llmcompressor.py writes
            head = f"{PEER}-w{self.bits}-g{self.group_size}-{PEER_CALIB[self.calib]}"
            return f"{head}-n{proto.nsamples}x{proto.seqlen}-s{seed}-ev{proto.windows}"
        tag = f"n{proto.nsamples}x{proto.seqlen}-s{seed}-" if self.seeded else ""
        tag += f"ev{proto.windows}"
        if self.tag():
            tag += f"-h{self.tag()}"
        return f"{self.key}__{tag}"

    def protocol(self, proto: Protocol, seed: int | None) -> dict[str, Any]:
        """The protocol recorded in the result file."""
        if self.method == "sweep-timing":
            return {
                "bits": 3,
                "group_size": 128,
                "nsamples": proto.timing_nsamples,
                "seqlen": proto.seqlen,
                "seed": TIMING_SEED,
            }
        p: dict[str, Any] = {"eval_windows": proto.windows, "eval_seqlen": EVAL_SEQLEN}
        if self.seeded:
            p.update(nsamples=proto.nsamples, seqlen=proto.seqlen, seed=seed)
        return p


# ----------------------------------------------------------------------------- the plan


def plan() -> list[Setting]:
    """Every row, in priority order (the order they run in; duplicates removed)."""
    W, A = IN_DOMAIN, OUT_OF_DOMAIN

    def q(tier, method, bits, gs, calib=None, frac=0.0, struct="unstructured"):
        return Setting(tier, method, bits, gs, frac, struct, calib if method != "rtn" else None)

    def trio(tier, bits, gs, calib, frac=0.0):
        return [
            q(tier, "rtn", bits, gs, None, frac),
            q(tier, "gptq", bits, gs, calib, frac),
            q(tier, "quantease", bits, gs, calib, frac),
        ]

    rows = [Setting("a", "reference"), Setting("a", "sweep-timing")]
    rows += trio("b", 3, 128, W) + [
        q("b", "quantease", 3, 128, W, 0.01),
        q("b", "quantease", 3, 128, W, 0.01, "columns"),
    ]
    rows += trio("c", 4, 128, W)
    rows += [q("d", m, b, 128, A) for b in (4, 3) for m in ("gptq", "quantease")]
    rows += trio("g", 3, 64, W) + trio("g", 3, 64, A) + [q("g", PEER, 3, 64, c) for c in (W, A)]
    rows += [
        q("e", "quantease", 2, 128, W, 0.02),
        q("e", "gptq", 2, 128, W, 0.02),
        q("e", "rtn", 2, 128, None, 0.02),
        q("e", "quantease", 2, 128, W, 0.02, "columns"),
    ]
    for bits in (3, 4):
        rows += trio("f", bits, -1, W) + [
            q("f", "quantease", bits, -1, W, 0.01),
            q("f", "quantease", bits, -1, W, 0.01, "columns"),
        ]
    rows += [
        q("f", "quantease", 4, 128, W, 0.01),
        q("f", "quantease", 4, 128, W, 0.01, "columns"),
        q("f", "gptq", 3, 128, W, 0.01),
        q("f", "rtn", 3, 128, None, 0.01),
        q("f", "gptq", 2, 128, W),
        q("f", "quantease", 2, 128, W),
    ]
    for bits in (3, 4):
        rows += [
            q("f", "quantease", bits, 128, A, 0.01),
            q("f", "quantease", bits, 128, A, 0.01, "columns"),
            q("f", "gptq", bits, -1, A),
            q("f", "quantease", bits, -1, A),
            q("f", "quantease", bits, -1, A, 0.01),
            q("f", "quantease", bits, -1, A, 0.01, "columns"),
        ]
    seen: set[str] = set()
    return [s for s in rows if not (s.key in seen or seen.add(s.key))]


def calib_source(calib: str, data: Path, scratch: Path) -> tuple[str, list[str]]:
    """The ``calib_data`` argument for ``calib`` and the files it stands for.

    In-domain = ``wikitext-2-v1-valid.txt``; out-of-domain = the Austen novels
    except *Pride and Prejudice*, linked (not copied) into ``scratch``.
    """
    if calib == IN_DOMAIN:
        f = data / "wikitext-2-v1-valid.txt"
        return str(f), [str(f)]
    files = sorted(p for p in (data / "austen").glob("*.txt") if p.name != "prideprejudice.txt")
    if not files:
        raise FileNotFoundError(f"no Austen novels under {data / 'austen'}")
    link_dir = scratch / "calib-austen-no-prideprejudice"
    link_dir.mkdir(parents=True, exist_ok=True)
    for old in link_dir.iterdir():
        if old.name not in {f.name for f in files}:
            old.unlink()
    for f in files:
        link = link_dir / f.name
        if not link.is_symlink() or link.resolve() != f.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(f.resolve())
    return str(link_dir), [str(f) for f in files]


# ----------------------------------------------------------------------------- targets as data


@dataclass(frozen=True)
class Target:
    """One target: every (subject, baseline) pair must pass ``kind``'s test at ``threshold``.

    Kinds (``quality_report.CHECKS``), all on means over seeds, WikiText-2 test:
    ``lower`` subject ppl < baseline ppl; ``removes_excess`` (excess_base −
    excess_subject) / excess_base ≥ threshold, excess = ppl − reference ppl;
    ``ratio_to_reference`` ppl / reference ≤ threshold (baseline unused);
    ``time_ratio`` convert s / baseline's convert s ≤ threshold.
    """

    title: str
    kind: str
    threshold: float | None
    pairs: tuple[tuple[str, str | None], ...]


# (bits, group size, baseline method, share of the baseline's excess QuantEase must remove)
EXCESS_TARGETS = ((3, 128, "gptq", 0.30), (3, -1, "gptq", 0.35), (3, 64, PEER, 0.20))
# (bits, group size, outlier fraction, structure, max ppl / reference)
OUTLIER_TARGETS = ((3, 128, 0.01, "unstructured", 1.6),)
TIME_RATIO = 2.5  # QuantEase (default) conversion wall time / textbook GPTQ's


def targets(rows: list[Setting]) -> list[Target]:
    """The targets over the settings of ``rows`` (pairs whose settings are not planned are left out)."""
    keys = {s.key for s in rows}
    qe = [s for s in rows if s.method == "quantease"]
    domains = (IN_DOMAIN, OUT_OF_DOMAIN)

    def setting(method, bits, gs, calib, frac=0.0, struct="unstructured"):
        return Setting("", "quantease", bits, gs, frac, struct, calib).twin(method).key

    def planned(pairs):
        return tuple((a, b) for a, b in pairs if a in keys and (b is None or b in keys))

    out = [
        Target(
            "QuantEase (default) < textbook GPTQ and < RTN at every setting, in and out of domain",
            "lower",
            None,
            planned((s.key, s.twin(m).key) for s in qe for m in ("gptq", "rtn")),
        )
    ]
    for bits, gs, base, share in EXCESS_TARGETS:
        g = "per channel" if gs == -1 else f"g{gs}"
        out.append(
            Target(
                f"W{bits} {g}: QuantEase removes ≥ {100 * share:g}% of {METHOD_LABEL[base]}'s excess, "
                "in and out of domain",
                "removes_excess",
                share,
                planned(
                    (setting("quantease", bits, gs, c), setting(base, bits, gs, c)) for c in domains
                ),
            )
        )
    for bits, gs, frac, struct, ratio in OUTLIER_TARGETS:
        out.append(
            Target(
                f"W{bits} g{gs} + {100 * frac:g}% {struct} outliers (QuantEase): ppl ≤ {ratio:g}× reference",
                "ratio_to_reference",
                ratio,
                planned((setting("quantease", bits, gs, c, frac, struct), None) for c in domains),
            )
        )
    out.append(
        Target(
            f"QuantEase (default) conversion wall time ≤ {TIME_RATIO:g}× textbook GPTQ's "
            "(same setting, same calibration)",
            "time_ratio",
            TIME_RATIO,
            planned((s.key, s.twin("gptq").key) for s in qe),
        )
    )
    return out
