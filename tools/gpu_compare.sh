#!/usr/bin/env bash
# The GPU paper presets at 2 arms x 2 seeds, in one command (issue 25).
#
#   tools/gpu_compare.sh --prepare [PRESET...]   # on a CPU machine with the Debian doc packages:
#                                                # make each preset's compare.prepare data (BPE + corpus)
#   tools/gpu_compare.sh --dry-run [PRESET...]   # validate every run's config, say whether the data is
#                                                # ready, print the commands; trains nothing
#   tools/gpu_compare.sh [PRESET...]             # on the GPU machine: train and write results under $OUT
#
# PRESET: a name under configs/compare/ or a path to a comparison file; default: lpr_paper_gpu and
# simbal_paper_gpu. The two arms of each are its baseline and the arm of its first claim (hf_lbl + lpr,
# seq_lbl + simbal), seeds 1 and 2, one run at a time (one GPU).
#
# The GPU machine has no package index: prepare the data here, then carry it (runs/data/prose_bpe32k,
# ~26 MB, under the 64 MiB a run may carry). The train step refuses to prepare data itself: a missing
# prepared.json is an error naming the command that makes it.
#
# Environment: OUT (results; default runs/gpu_compare/out): per preset results.md, results.json, the
# plots, each run's config, gzipped metrics log and summary, and wall_seconds.txt; never checkpoints.
# WORK (the runs themselves, checkpoints included; default runs/gpu_compare/work). PY (the Python with
# torch; default .venv/bin/python when present, else python3). GPU_COMPARE_ARGS: extra arguments for
# `moe-dist compare` (e.g. --steps 4 for a smoke run).
set -u -o pipefail
cd "$(dirname "$0")/.."

mode=run
case "${1:-}" in
  --prepare) mode=prepare; shift ;;
  --dry-run) mode=dry; shift ;;
  -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
  -*) echo "error: unknown option $1 (use --prepare, --dry-run or none)" >&2; exit 2 ;;
esac
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(lpr_paper_gpu simbal_paper_gpu)
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-runs/gpu_compare/out}
WORK=${WORK:-runs/gpu_compare/work}
read -r -a extra <<< "${GPU_COMPARE_ARGS:-}"

# name -> file; prints "FILE NAME ARMS DATA_STATE" (DATA_STATE: ready | missing | none), or an error.
describe() {
  "$PY" - "$1" <<'EOF'
import json, sys
from pathlib import Path
from moe_dist.compare.presets import preset_path, split_compare_file
from moe_dist.config import ConfigError
arg = sys.argv[1]
try:
    path = Path(arg) if arg.endswith((".yaml", ".yml")) else preset_path(arg)
    _, section = split_compare_file(str(path))
except ConfigError as exc:
    print("error: " + "; ".join(exc.errors), file=sys.stderr)
    sys.exit(2)
if not section.claims or not section.baseline:
    print(f"error: {path}: needs compare.baseline and at least one claim (its arm is the second arm)", file=sys.stderr)
    sys.exit(2)
arms = [section.baseline] + [a for a in [section.claims[0].arm] if a != section.baseline]
state = "none"
if section.prepare is not None:
    d = Path(section.prepare.dir)
    ok = (d / "prepared.json").is_file() and all((d / f).is_file() for f in ("tokenizer.json", "corpus.bin", "corpus.idx"))
    state = "ready" if ok else "missing"
print(path, path.stem, ",".join(arms), state)
EOF
}

failed=0
for preset in "${presets[@]}"; do
  line=$(describe "$preset") || exit 2
  read -r file name arms data <<< "$line"
  if [ "$mode" = prepare ]; then
    "$PY" -m moe_dist.compare.prepare "$file" || exit 2
    continue
  fi
  cmd=("$PY" -m moe_dist.cli compare "$file" --variants "$arms" --seeds 1,2 --parallel 1
       --out "$WORK/$name" --quiet "${extra[@]}")
  if [ "$mode" = dry ]; then
    "$PY" - "$file" "$arms" "${extra[@]}" <<'EOF' || exit 2
import sys
from pathlib import Path
from moe_dist.compare.plan import CompareOptions, build_configs
from moe_dist.config import ConfigError
file, arms, extra = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
steps = int(extra[extra.index("--steps") + 1]) if "--steps" in extra else None
try:
    cfgs = build_configs(CompareOptions(config=file, variants=arms, out=Path("/dry/run"), seeds=[1, 2], steps=steps))
except ConfigError as exc:
    print("error: " + "; ".join(exc.errors), file=sys.stderr)
    sys.exit(2)
c = next(iter(cfgs.values()))
m, d, s = c["model"], c["data"], c["schedule"]
tokens = s["steps"] * d["micro_batch_size"] * d["seq_len"] * d["grad_accum"]
print(f"  {len(cfgs)} runs valid: {', '.join(cfgs)}; dim {m['dim']}, {m['n_layers']} layers, "
      f"{m['moe']['num_experts']} experts; {s['steps']} steps, {tokens / 1e6:.1f}M tokens per run")
EOF
    echo "$name: data $data; would run: ${cmd[*]}"
    continue
  fi
  if [ "$data" = missing ]; then
    echo "error: $name: its prepared data is missing; run tools/gpu_compare.sh --prepare $preset on a machine with the packages, then carry the folder" >&2
    failed=1
    continue
  fi
  echo "$name: ${cmd[*]}"
  t0=$(date +%s)
  "${cmd[@]}"
  rc=$?
  t1=$(date +%s)
  dest="$OUT/$name"
  mkdir -p "$dest/configs" "$dest/logs"
  echo "$((t1 - t0))" > "$dest/wall_seconds.txt"
  cp "$WORK/$name"/results.md "$WORK/$name"/results.json "$WORK/$name"/*.png "$dest/" 2>/dev/null
  cp "$WORK/$name"/configs/*.yaml "$dest/configs/" 2>/dev/null
  for run in "$WORK/$name"/runs/*/seed*; do
    [ -f "$run/metrics.jsonl" ] || continue
    key="$(basename "$(dirname "$run")")_$(basename "$run")"
    gzip -c "$run/metrics.jsonl" > "$dest/logs/$key.metrics.jsonl.gz"
    [ -f "$run/summary.json" ] && cp "$run/summary.json" "$dest/logs/$key.summary.json"
    [ -f "$run/train.log" ] && tail -n 40 "$run/train.log" > "$dest/logs/$key.train.log.tail"
  done
  echo "$name: exit $rc after $((t1 - t0)) s; results in $dest"
  [ $rc -eq 0 ] || failed=1
done
exit $failed
