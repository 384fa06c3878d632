#!/usr/bin/env bash
# Every GPU measurement of this project in one command, at most 8 minutes of wall time:
#   bash benchmarks/gpu_session.sh             on the GPU machine (results in $OUT)
#   bash benchmarks/gpu_session.sh --dry-run   the same parts on the CPU, toy shapes (LOPT_GPU_DRY_RUN=1 too)
#   bash benchmarks/gpu_session.sh --list      the parts and their time budgets, one "name seconds" a line
# Parts, most decision-relevant first, each a process under its own `timeout` (benchmarks/gpu/<part>.py):
#   kernels  wheels from .whl/, lopt_kernels._C built, the kernel tests on CUDA (the gpu-marked bf16 tests at real
#            shapes first): a kernel group found wrong skips the timed measurements that run it
#   e2e      Llama-3.2-1B shape, seq 2048, batch 4: hf, hf+liger, lopt-paper, lopt, lopt+kernels: tokens/s,
#            persistent and transient memory, MFU, the planner's predicted peak beside the measured one
#   micro    linear cross-entropy: fused vs eager, torch.compile of a chunked version, Liger; recon_loss: fused vs
#            eager and compiled
#   zo       the ZO step (lopt.zo: lowrank, highrank, fullrank) vs MeZO's loop and the best plain loop, Llama-3.2-1B
#            shape, batch 16, bf16: ms per step, tokens/s, peak memory
#   capped   tokens/s under a 24 GB cap at each method's largest fitting batch (sized from the e2e rows)
#   offload  the offloaded Llama-3.1-8B step under 24 GB against the planner's prediction
# A part's limit is its budget plus whatever the parts before it left unused, never more than keeps every later
# part's budget and the 480 s total; the budgets sum to 465 s (15 s for the environment, the bookkeeping between
# parts and the summary). Each part writes $OUT/<part>.json as it measures (device, torch, triton, commit, date,
# status ok / skipped / failed with a reason); a part cut at its limit keeps what it measured. At the end
# $OUT/summary.md; the whole log is $OUT/session.log: 8 files, what the device tool brings back.
# Wheels the GPU machine lacks travel in .whl/ (benchmarks/gpu/fetch_wheels.sh fetches them; name .whl in the
# device tool's carry) and are installed into a scratch folder on PYTHONPATH: the machine's torch is left alone.
# Without .git on the machine, set LOPT_COMMIT=<sha> in the command; every file also has a source_digest.
# The device tool's command:  LOPT_COMMIT=<sha> bash benchmarks/gpu_session.sh   (carry [".whl"], timeout_s 540)
set -uo pipefail
cd "$(dirname "$0")/.."

# name, budget in seconds, what it measures
PARTS=(
  "kernels 145 build lopt_kernels._C; kernel tests on CUDA, bf16 at real shapes first"
  "e2e 120 Llama-3.2-1B seq 2048 batch 4: hf, hf+liger, lopt-paper, lopt, lopt+kernels"
  "micro 55 linear cross-entropy and recon_loss against eager, compiled and Liger"
  "zo 60 the ZO step (lowrank, highrank, fullrank) against MeZO's loop and the best plain loop"
  "capped 35 tokens/s under a 24 GB cap at each method's largest fitting batch"
  "offload 50 the offloaded Llama-3.1-8B step under 24 GB against the planner"
)
TOTAL_S=480     # the whole command, wall time
SUMMARY_S=5     # kept back at the end for summary.md
GRACE_S=5       # timeout's TERM, then KILL this much later

case "${1:-}" in
  --list)
    for p in "${PARTS[@]}"; do read -r name budget _ <<<"$p"; echo "$name $budget"; done
    echo "total $TOTAL_S"
    exit 0 ;;
  --dry-run) export LOPT_GPU_DRY_RUN=1; shift ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1 (--dry-run, --list, --help)" >&2; exit 2 ;;
esac
[[ $# -eq 0 ]] || { echo "unexpected arguments: $*" >&2; exit 2; }

START=$(date +%s)
DEADLINE=$((START + TOTAL_S - SUMMARY_S))
PY=${PYTHON:-python3}
DRY=${LOPT_GPU_DRY_RUN:-0}
if [[ -z ${OUT:-} && $DRY == 1 ]]; then
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/lopt-gpu-dry.XXXXXX")
elif [[ -z ${OUT:-} ]]; then
  OUT=benchmarks/results/gpu-session-$(date +%F)
fi
export OUT
mkdir -p "$OUT"
LOPT_GPU_WORK=$(mktemp -d "${TMPDIR:-/tmp}/lopt-gpu-work.XXXXXX")
export LOPT_GPU_WORK LOPT_GPU_SITE=$LOPT_GPU_WORK/site LOPT_GPU_ENV=$LOPT_GPU_WORK/env.json
[[ ${LOPT_GPU_KEEP_WORK:-0} == 1 ]] || trap 'rm -rf "$LOPT_GPU_WORK"' EXIT
export PYTHONPATH=$LOPT_GPU_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
[[ $DRY == 1 ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two worker processes at once on a small CPU

exec > >(tee -a "$OUT/session.log") 2>&1
TEE_PID=$!

echo "=== GPU session $(date -u +%FT%TZ), dry run $DRY, results in $OUT, $TOTAL_S s in all"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
timeout 45 "$PY" -m benchmarks.gpu.session env --out "$LOPT_GPU_ENV" || echo "environment: not found (each part finds its own)"

names=()
budgets=()
for p in "${PARTS[@]}"; do read -r name budget _ <<<"$p"; names+=("$name"); budgets+=("$budget"); done

failed=0
for i in "${!names[@]}"; do
  name=${names[$i]}
  budget=${budgets[$i]}
  later=0
  for ((j = i + 1; j < ${#names[@]}; j++)); do later=$((later + budgets[j])); done
  now=$(date +%s)
  limit=$((DEADLINE - now - later))  # its budget, plus what the parts before it left unused
  if ((limit < 10)); then
    echo "=== $name: no time left ($limit s)"
    "$PY" -m benchmarks.gpu.session finish "$name" --rc -1 --budget "$budget" --limit "$limit" --elapsed 0
    continue
  fi
  echo "=== $name: limit $limit s (budget $budget s), $((now - START)) s into the session"
  export LOPT_PART_DEADLINE=$((now + limit - GRACE_S - 3))  # the part winds itself up before timeout's TERM
  timeout --kill-after="$GRACE_S" "$((limit - GRACE_S))" "$PY" -m "benchmarks.gpu.$name"
  rc=$?
  # finish exits 3 when the part's final status is failed
  "$PY" -m benchmarks.gpu.session finish "$name" --rc "$rc" --budget "$budget" --limit "$limit" \
    --elapsed "$(($(date +%s) - now))" || failed=1
done
unset LOPT_PART_DEADLINE

parts=$(IFS=,; echo "${names[*]}")
timeout 30 "$PY" -m benchmarks.gpu.session summary --parts "$parts" || failed=1
"$PY" -m benchmarks.gpu.session check-out || failed=1
cat "$OUT/summary.md" 2>/dev/null  # the device tool's output tail holds it even if no file comes back
echo "=== done in $(($(date +%s) - START)) s; exit status $failed"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $failed
