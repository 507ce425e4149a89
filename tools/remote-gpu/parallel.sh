#!/usr/bin/env bash
# Several tools/remote-gpu/recipe.py jobs at once on one GPU machine, e.g. a --recalibrate job beside
# fold jobs, each with its own --budget-s, in one call of a short lease. It does not buy throughput:
# on an H100, five jobs at once took about 250 s a trial each, against about 55 s for one job alone
# (docs/results.md, lesion section, run d). Each argument holds one job's recipe.py options;
# job N works in $WORK/jobN. Its small files (summary, metrics, calibration, outline level, config,
# logs, each trial's evaluation.npz; no checkpoints, no embeddings) are packed into
# $OUT/results.tgz every 20 s and at the end, so what comes back stays one file, also when the
# lease ends first. tools/remote-gpu/merge_runs.py ensembles one fold's trials from several leases.
#   OUT=/some/folder bash tools/remote-gpu/parallel.sh "--recalibrate models/lesion-fold5" \
#       "--no-serve --folds 1 --trials 5 --budget-s 420" "--no-serve --folds 2 --trials 5 --budget-s 420"
# Unpack here with: mkdir -p runs/X && tar xzf results.tgz -C runs/X
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder that receives results.tgz}"
[ "$#" -ge 1 ] || { echo "give each job's recipe.py options as one argument" >&2; exit 2; }
WORK=${WORK:-/tmp/neurocbir-gpu-jobs}
LIMIT_S=${LIMIT_S:-520}  # each job is stopped after this; its own --budget-s should end it well before
rm -rf "$WORK"  # a warm machine keeps the last call's jobs: they would be packed again
mkdir -p "$OUT" "$WORK"
# shellcheck source=tools/remote-gpu/setup.sh
source tools/remote-gpu/setup.sh
pack() {
  (cd "$WORK" && find . -size -4M \( -name '*.json' -o -name '*.jsonl' -o -name '*.txt' -o -name evaluation.npz \) -print0 |
    tar czf "$WORK.tgz.part" --null -T -) && mv -f "$WORK.tgz.part" "$OUT/results.tgz"
}
threads=$(($(nproc) / $# > 0 ? $(nproc) / $# : 1))
pids=()
n=0
for opts in "$@"; do
  n=$((n + 1))
  mkdir -p "$WORK/job$n"
  echo "job$n: $opts" | tee "$WORK/job$n/options.txt"
  # shellcheck disable=SC2086 # each job's options are split into words on purpose
  OMP_NUM_THREADS=$threads timeout "$LIMIT_S" "$PY" tools/remote-gpu/recipe.py --out "$WORK/job$n" \
    "${GPU_ARGS[@]}" $opts >"$WORK/job$n/log.txt" 2>&1 &
  pids+=("$!")
done
(while sleep 20; do pack || true; done) &
packer=$!
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
kill "$packer" 2>/dev/null || true
pack
for log in "$WORK"/job*/log.txt; do echo "== $log"; tail -n 4 "$log"; done
echo "$failed of $n jobs failed"
[ "$failed" -eq 0 ]
