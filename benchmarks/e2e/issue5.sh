#!/usr/bin/env bash
# The measurements behind issue 5's goals, on one H100 or H200, from the repository root:
#   bash benchmarks/e2e/issue5.sh [g1|g2|g3|levers|all]
# Every row lands in one results file (--append); then the report writes the table and plots beside it.
# hf+liger needs Liger-Kernel installed (pip install --no-deps liger-kernel; 0.8.5 patches transformers 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
GPU=$(python -c "import torch; n=torch.cuda.get_device_name(0).lower(); print(next((k for k in ('h200','h100') if k in n), 'gpu'))")
OUT=${OUT:-benchmarks/results/e2e-$(date +%F)-$GPU.json}
MODEL=${MODEL:-llama-3.2-1b}
METHODS=${METHODS:-hf,hf+liger,lopt-paper,lopt,lopt+kernels}
RUN="python -m benchmarks.e2e.run --models $MODEL --methods $METHODS --append --out $OUT"
what=${1:-all}

if [[ $what == g1 || $what == all ]]; then
  # Goals 1 and 4: transient peak and MFU at seq 2048, batch 4, no recomputation, uncapped; plus the
  # rows the planner's 10% check uses (their predicted_peak_gb beside the measured peak).
  $RUN --seq-lens 2048 --batch-sizes 4 --mem-caps none --recompute none --steps 10 --warmup 3
  $RUN --methods lopt,lopt+kernels --seq-lens 512,2048 --batch-sizes 1,8 --mem-caps none --recompute none,full --steps 5 --warmup 2
fi
if [[ $what == g2 || $what == all ]]; then
  # Goal 2: under a 24 GB cap at seq 2048, each method's largest fitting micro-batch per recomputation,
  # then that setting timed with the full step count.
  $RUN --search batch --seq-lens 2048 --batch-sizes 1 --mem-caps 24 --recompute none,full --max-batch-size 64 --steps 10 --warmup 3
fi
if [[ $what == g3 || $what == all ]]; then
  # Goal 3: the longest sequence at batch 1 under 24 GB (recomputation as each method does best).
  $RUN --search seq --seq-lens 4096 --batch-sizes 1 --mem-caps 24 --recompute full --seq-granularity 1024 --steps 3 --warmup 1
  $RUN --methods lopt,lopt+kernels --search seq --seq-lens 4096 --batch-sizes 1 --mem-caps 24 --recompute none --seq-granularity 1024 --steps 3 --warmup 1
fi
if [[ $what == levers || $what == all ]]; then
  # Goal 5: the recipe's optimizer levers (bf16 / 8-bit state, early lower-block step) beside hf+liger with the same optimizer.
  $RUN --models llama-3.2-1b,qwen2.5-1.5b,llama-3.2-3b --methods hf+liger,lopt+kernels --seq-lens 2048 --batch-sizes 1 \
       --mem-caps 24 --recompute full --optimizers adamw-bf16 --early-lower-step off,on --steps 3 --warmup 1
fi
python -m benchmarks.e2e.report "$OUT"
