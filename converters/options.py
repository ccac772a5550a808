"""Every setting of a conversion, defined once: defaults, choices, ``--help`` and checks.

:class:`ConvertOptions` is the one frozen object that travels unchanged from
``qe-convert``'s command line through the pipeline to the solvers; each field
carries its help text and choices, so the CLI is generated from it
(``qe_vllm/cli/convert.py``) and the provenance is ``asdict`` of it. Nothing
renames a setting on the way down.

The defaults are the best configuration measured on *validation* text
(``benchmarks/results/defaults.md``): QuantEase from a GPTQ start, blocks
solved true-sequentially, the error-propagation target, and the sweeps'
Σ shrunk towards its diagonal.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from qe_vllm.converters.calibration import DATASETS, FORMATS
from qe_vllm.converters.grid import GridSpec

METHODS = ("rtn", "gptq", "quantease")
INITS = ("w", "rtn", "gptq")
STRUCTURES = ("unstructured", "columns")


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A dataclass field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that determines the converted weights (and nothing that does not)."""

    method: str = option(
        "quantease",
        "quantease: coordinate descent from a GPTQ start; gptq; rtn: round to nearest, no data",
        choices=METHODS,
    )
    bits: int = option(4, "bits per weight code", choices=(2, 3, 4, 8))
    group_size: int = option(
        128, "input columns sharing one scale/zero: a power of two >= 8, or -1 for one group per row"
    )
    sym: bool = option(False, "symmetric grid (no stored zero points) instead of asymmetric")
    outlier_fraction: float = option(
        0.0, "fraction of each layer's weights kept as float16 outliers, e.g. 0.01"
    )
    outlier_structure: str = option(
        "unstructured", "outliers anywhere, or whole input columns", choices=STRUCTURES
    )
    iters: int = option(5, "QuantEase sweeps (each stops early once it gains < 1e-4 relative)")
    init: str = option("gptq", "QuantEase start point", choices=INITS)
    damp: float = option(
        0.01, "GPTQ dampening (also QuantEase's GPTQ start), relative to mean diag(Σ)"
    )
    cd_damp: float = option(
        0.0, "QuantEase sweeps: add cd_damp * mean(diag Σ) to Σ's diagonal (a uniform ridge towards W)"
    )
    shrink: float = option(
        0.3,
        "QuantEase sweeps: Σ <- (1 - shrink) Σ + shrink diag(Σ), in [0, 1); per-column damping, "
        "which trusts each input's own energy but less of the cross-correlations that do not "
        "carry to new text",
    )
    propagation: float = option(
        0.5,
        "weight of the error-propagation target in [0, 1]: 1 fits the full-precision layer's "
        "output on the inputs the quantized model really produces, 0 the usual layer-wise target",
    )
    true_sequential: bool = option(
        True,
        "inside a block solve [q,k,v] -> [o] -> [gate,up] -> [down], re-running the block "
        "between groups so each group sees its quantized predecessors",
    )
    act_order: bool = option(
        True,
        "GPTQ passes (--method gptq, and QuantEase's GPTQ start) quantize columns by decreasing "
        "activation energy diag(Σ); no effect on RTN or another --init",
    )
    mse_grid: bool = option(
        True,
        "shrink each group's min/max range to minimise the rounding error of its weights",
        flag="--mse",
    )
    calib_data: str | None = option(
        None,
        "calibration text: a .txt/.json/.jsonl/.parquet file, a directory of .txt files, a "
        f"named dataset ({', '.join(DATASETS)}; needs the network or a datasets cache) or any "
        "datasets name NAME[:CONFIG][@SPLIT]; default: the public-domain corpus bundled with "
        "the package (converters/data/calibration), so no network is needed",
    )
    calib_format: str = option(
        "text",
        "text: plain text; chat: conversations (a 'messages' column) rendered with the "
        "tokenizer's chat template, as an instruct model is served",
        choices=FORMATS,
    )
    nsamples: int = option(128, "calibration windows")
    seqlen: int = option(2048, "tokens per calibration window")
    seed: int = option(0, "seed of the calibration windows")

    @property
    def spec(self) -> GridSpec:
        return GridSpec(self.bits, self.group_size, self.sym)

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"

    def check(self) -> None:
        """Refuse inconsistent settings with one message naming the flag."""
        self.check_solver()
        if self.calibrated and (self.nsamples < 1 or self.seqlen < 2):
            raise ValueError(
                f"--nsamples {self.nsamples} / --seqlen {self.seqlen}: calibration needs at least "
                "1 sample of at least 2 tokens"
            )

    def check_solver(self) -> None:
        """The checks that concern one layer's solve (no calibration data involved)."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(
                    f"{flag(f.name)} {value!r} is not supported; choose one of {list(choices)}"
                )
        if self.damp < 0 or self.cd_damp < 0:
            raise ValueError(
                f"--damp {self.damp} / --cd-damp {self.cd_damp}: dampening cannot be negative"
            )
        if not 0 <= self.shrink < 1:
            raise ValueError(f"--shrink {self.shrink} must be in [0, 1)")
        if not 0 <= self.propagation <= 1:
            raise ValueError(f"--propagation {self.propagation} must be in [0, 1]")
        if not 0 <= self.outlier_fraction < 1:
            raise ValueError(f"--outlier-fraction {self.outlier_fraction} must be in [0, 1)")
        if self.iters < 0:
            raise ValueError(f"--iters {self.iters} cannot be negative")
        if (
            self.method == "rtn"
            and self.outlier_fraction > 0
            and self.outlier_structure != "unstructured"
        ):
            raise ValueError(
                "method rtn keeps unstructured outliers only; use --outlier-structure unstructured"
            )


def flag(name: str) -> str:
    """The command-line flag of a :class:`ConvertOptions` field."""
    f = next(f for f in fields(ConvertOptions) if f.name == name)
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(ConvertOptions) if f.default is not MISSING}
