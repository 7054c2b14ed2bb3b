#!/usr/bin/env bash
# The GPU check in one prepared run (docs/performance.md#gpu-check):
#
#   bash benchmarks/gpu_check.sh [--tiny] [--out DIR] [--wheels DIR] [--python PYTHON]
#
#   0. installs what a bare GPU machine lacks: the Python packages probekit needs that do not
#      import, from the wheels in --wheels (default .whl, made by benchmarks/gpu_wheels.sh, for a
#      machine without network) or else from the package index; probekit itself is read from
#      this checkout (PYTHONPATH), not installed;
#   1. the CUDA checks: pytest -m gpu (tests/test_gpu.py), with a JUnit report;
#   2. the gpu scenario of benchmarks/vs_hf_trainer.py: a 32-block width-4096 Llama with random
#      weights, 8,000 examples of ~128 tokens, safety8k against the Hugging Face Trainer, both
#      under bf16 autocast;
#   3. nvidia-smi and the library versions.
#
# Every step runs under its own time limit (install 1 minute, tests 2, benchmark 6, versions 0.5:
# at most 9.5 in all, so a 10-minute device command always returns), and a failed step does not
# stop the next one. Everything lands in DIR (default: $OUT where that is set, else
# gpu-check-<time>), at most 8 files, none in sub-folders:
#   summary.txt  each step's exit status and time, the test tally, the benchmark's table
#   install.log  what was missing and what was installed
#   tests.log    pytest's output;  tests.xml  its JUnit report
#   bench.log    the benchmark's output;  bench.json  its figures;  bench.png  its plot
#   env.txt      nvidia-smi, python and library versions
#
# --tiny is the dry run for a machine without a GPU: the same steps with the cpu cases of the
# tests and the benchmark's 4-block width-64 Llama on 64 rows, so the GPU run is the script's
# first real run, not its first run.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TINY=0
OUT_DIR="${OUT:-}"
WHEELS="$ROOT/.whl"
PYTHON="${PYTHON:-python3}"
needs() { [ "$2" -ge 2 ] || { echo "gpu_check.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in --out|--wheels|--python) needs "$1" $# ;; esac
    case "$1" in
        --tiny) TINY=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        --python) PYTHON="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT_DIR="${OUT_DIR:-$ROOT/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
cd "$ROOT" || exit 2

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Fewer fragments for the 60+ GiB the benchmark's baseline holds.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S LOG COMMAND...: run COMMAND with a time limit, its output into LOG; record
# its exit status and wall time.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local start=$SECONDS
    say "== $name (limit ${limit} s): $*"
    # Through bash, so that COMMAND may be one of the exported functions below.
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" > "$log" 2>&1
    local rc=$?
    local verdict="ok"
    [ $rc -ne 0 ] && verdict="FAILED"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT"
    say "== $name: $verdict (exit $rc) in $((SECONDS - start)) s"
    return $rc
}

say "probekit GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), mode $([ $TINY = 1 ] && echo tiny || echo full)"

# -- 0. install what is missing ---------------------------------------------------------------
install() {
    # import name -> distribution, for what probekit, its tests and the benchmark import
    local pairs="pydantic:pydantic typer:typer einops:einops yaml:pyyaml jinja2:jinja2 accelerate:accelerate
        safetensors:safetensors sklearn:scikit-learn numpy:numpy matplotlib:matplotlib tqdm:tqdm
        transformers:transformers tokenizers:tokenizers hypothesis:hypothesis pytest:pytest"
    local missing=()
    for pair in $pairs; do
        "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "nothing missing"
    elif [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "missing: ${missing[*]}; installing the wheels of $WHEELS"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl || return 1
    else
        echo "missing: ${missing[*]}; installing from the package index"
        "$PYTHON" -m pip install -q "${missing[@]}" || return 1
    fi
    "$PYTHON" -c "import torch, transformers, pydantic, probekit, probekit.training; print('probekit', probekit.__version__, 'imports; torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}
export -f install
export PYTHON WHEELS
step "0. install" 60 "$OUT_DIR/install.log" install
tail -n 1 "$OUT_DIR/install.log" | tee -a "$SUMMARY"

CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$TINY" = 0 ] && [ "$CUDA" != 1 ]; then
    say "no CUDA device seen by $PYTHON: the full check needs one (--tiny is the CPU dry run)"
fi

# -- 1. the CUDA checks -------------------------------------------------------------------------
step "1. pytest -m gpu" 120 "$OUT_DIR/tests.log" "$PYTHON" -m pytest -m gpu tests/test_gpu.py \
    -p no:cacheprovider -q -rs --junitxml="$OUT_DIR/tests.xml"
grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT_DIR/tests.log" | tail -n 12 | tee -a "$SUMMARY"

# -- 2. the gpu benchmark scenario --------------------------------------------------------------
BENCH=(benchmarks/vs_hf_trainer.py --scenario gpu --json "$OUT_DIR/bench.json" --plot "$OUT_DIR/bench.png")
[ "$TINY" = 1 ] && BENCH+=(--tiny --rows 64)
step "2. benchmark: gpu scenario" 360 "$OUT_DIR/bench.log" "$PYTHON" "${BENCH[@]}"
sed -n '/^ *baseline  *probekit$/,$p' "$OUT_DIR/bench.log" | tee -a "$SUMMARY" > /dev/null
grep -E "^(scenario|machine|card)" "$OUT_DIR/bench.log" >> "$SUMMARY"
tail -n 5 "$OUT_DIR/bench.log" | grep -E "Error|error" >> "$SUMMARY"

# -- 3. the machine and the libraries -----------------------------------------------------------
environment() {
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
import platform

import torch

print("python", platform.python_version(), platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device", props.name, f"{props.total_memory / 2**30:.1f} GiB", f"{props.multi_processor_count} SMs")
    print("bf16 supported", torch.cuda.is_bf16_supported())
for name in ("transformers", "accelerate", "tokenizers", "safetensors", "pydantic", "numpy", "hypothesis", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
}
export -f environment
step "3. nvidia-smi and versions" 30 "$OUT_DIR/env.txt" environment
grep -E "^(device|torch|transformers) " "$OUT_DIR/env.txt" | tee -a "$SUMMARY"

say "results in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
# Exit 0 only when the tests and the benchmark both passed.
grep -q "== 1. pytest -m gpu: ok" "$SUMMARY" && grep -q "== 2. benchmark: gpu scenario: ok" "$SUMMARY"
