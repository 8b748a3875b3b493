#!/usr/bin/env bash
# Every GPU check in one command, on a bare GPU machine (tests/gpu/README.md). About 8 minutes on
# one H200 (417 s on 2026-12-04, before the fp32-residual row; the compiled variants take 80 s of
# it: GPU_CHECK_DEADLINE_S cuts the tail). Writes every result under $OUT (default runs/gpu_check):
#   env.json                  device, torch, CUDA, the packages used
#   bench_train.jsonl         tools/bench_train.py, one JSON object per config and variant (eager,
#                             model.compile): tokens/s, MFU, peak memory, breakdown, host gaps
#   bench_layer_cuda.json     the MoE layer against Megatron-Core and a bf16 GEMM, three shapes,
#                             with our layer's kernels by device time (--profile 2)
#   bench_layer_cuda_accumulated.json   ours again, gradients kept across steps (issue 24's method)
#   tests_gpu.xml, tests_gpu.log   pytest tests/gpu (JUnit XML and the log)
#   summary.txt               one line per check with its exit code and seconds
# Usage:  tools/gpu_check.sh [--dry-run]     (from the repository root)
# GPU_CHECK_DEADLINE_S=N ends the script within N seconds (a lease's limit): each check's own
# limit is cut to what is left, and checks that would get under 20 s are skipped. The checks run
# in the order of what they decide (the MFU targets first), so a cut run loses the least.
# Missing Python packages (pydantic, megatron-core) are installed from the ignored .whl/ folder
# when the machine has no package index (how to fill it: tests/gpu/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"

# 1. packages: from .whl/ into a private target dir when they are missing
have() { $PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)"; }
if ! { have pydantic && have megatron; } && [ -d .whl ]; then
  echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/"
  [ $DRY = 1 ] || $PY -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl
  export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

check() {  # check NAME TIMEOUT_S COMMAND...: run it, record its exit code, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  if [ $DRY = 1 ]; then echo "$name dry-run" >> "$OUT/summary.txt"; return; fi
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then echo "$name skipped (deadline)" >> "$OUT/summary.txt"; return; fi
  fi
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" >> "$OUT/summary.txt"
}
DEADLINE=${GPU_CHECK_DEADLINE_S:-0}

# 2. what ran where
check env 60 $PY -c "
import json, sys, torch
info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': sys.version.split()[0],
        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for mod in ('megatron.core', 'transformers', 'pydantic'):
    try:
        m = __import__(mod, fromlist=['__version__']); info[mod] = getattr(m, '__version__', '?')
    except ImportError as exc:
        info[mod] = 'missing: %s' % exc
json.dump(info, open('$OUT/env.json', 'w'), indent=1); print(info)"

# 3. training throughput (the byte-level stdlib corpus: throughput does not depend on the text,
#    and the machine needs no prepared data). The two MFU targets first, eager and compiled.
BYTES=(--set data.paths=[] --set data.tokenizer.kind=bytes --set data.max_bytes=4000000)
bench_train() {  # bench_train NAME TIMEOUT_S CONFIG [ARGS...]: one line of bench_train.jsonl
  local name=$1 limit=$2 cfg=$3
  shift 3
  check "bench_train_$name" "$limit" $PY tools/bench_train.py "$cfg" "${BYTES[@]}" --steps 10 --warmup 3 \
    "$@" --out "$OUT/bench_train_$name.json"
  [ -f "$OUT/bench_train_$name.json" ] && tr -d '\n' < "$OUT/bench_train_$name.json" >> "$OUT/bench_train.jsonl" \
    && echo >> "$OUT/bench_train.jsonl" && rm "$OUT/bench_train_$name.json"
}
: > "$OUT/bench_train.jsonl"
bench_train mixtral_gpu 90 configs/models/mixtral_gpu.yaml
# the residual stream as it was before issue 24's third session (fp32), for an A/B in one run
bench_train mixtral_gpu_fp32_residual 90 configs/models/mixtral_gpu.yaml --set model.fp32_residual=true
bench_train simbal_paper_gpu 90 configs/compare/simbal_paper_gpu.yaml
bench_train mixtral_gpu_compiled 150 configs/models/mixtral_gpu.yaml --set model.compile=true
bench_train simbal_paper_gpu_compiled 150 configs/compare/simbal_paper_gpu.yaml --set model.compile=true

# 4. the layer against Megatron-Core and the GEMM ceiling
check bench_layer_cuda 120 $PY tools/bench_layer_cuda.py --iters 10 --profile 2 --out "$OUT/bench_layer_cuda.json"

# 5. tests/gpu
check tests_gpu 180 $PY -m pytest -q -p no:cacheprovider tests/gpu -o addopts= --timeout=100 \
  --junitxml "$OUT/tests_gpu.xml" 2>&1 | tee "$OUT/tests_gpu.log"

# 6. the layer as issue 24 measured it (gradients kept across timed steps): the targets' yardstick
check bench_layer_cuda_accumulated 60 $PY tools/bench_layer_cuda.py --iters 10 --only-ours --accumulate-grads \
  --out "$OUT/bench_layer_cuda_accumulated.json"

# 7. the other GPU model configs
bench_train qwen3_moe_gpu 90 configs/models/qwen3_moe_gpu.yaml
bench_train deepseek_v3_gpu 90 configs/models/deepseek_v3_gpu.yaml

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
! grep -qv "rc=0\|dry-run" "$OUT/summary.txt"
