#!/usr/bin/env bash
# Everything that needs a GPU, as stages; one command runs one or several of them in order:
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#     build-tests   build lopt_kernels._C; the kernel tests (on CUDA) and the `gpu` tests
#     micro         kernel microbenchmarks (pytest-benchmark JSON, short rounds)
#     boundary      the boundary-memory measurement (issue 4)
#     e2e-g1 e2e-g2 e2e-g3 e2e-levers   the end-to-end goals (issue 5; benchmarks/e2e/issue5.sh)
# The device tool allows 10 minutes per command and 30 minutes per developer session, so the plan is
# three commands (sized to fit; not yet timed on a GPU):
#   1. build-tests micro boundary     2. e2e-g1 e2e-g3     3. e2e-g2 e2e-levers
# Each stage has its own time limit (STAGE_LIMIT_S, default 280 s) so one slow stage cannot starve the
# next; results files are rewritten after every row, so a stage cut short keeps what it measured.
# Results land in $OUT when set (the device tool's output folder), else in benchmarks/results/; commit
# them under benchmarks/results/. The e2e stages append to benchmarks/results/e2e-<date>-<gpu>.json
# when an earlier command's file was copied back there, so three commands build one results file.
# The install leaves the machine's torch alone; wheels carried in .whl/ (liger-kernel, datasets,
# bitsandbytes) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
DAY=$(date +%F)
GPU=$(python -c "import torch; n=torch.cuda.get_device_name(0).lower(); print(next((k for k in ('h200','h100') if k in n), 'gpu'))")
LIMIT=${STAGE_LIMIT_S:-280}
export PYTHONUNBUFFERED=1

install() {
  if [ -d .whl ]; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  LOPT_REQUIRE_CUDA_BUILD=1 python -m pip install -q --no-deps --no-build-isolation -e . || return 1
  python -c "import lopt_kernels; assert lopt_kernels.has_extension(); print('lopt_kernels._C loaded')"
}

stage() {
  case "$1" in
    build-tests)
      python -m pytest -q tests/test_layer_ops.py tests/test_recon_loss.py tests/test_linear_cross_entropy.py \
        tests/test_adamw.py tests/test_engine_kernels.py tests/test_boundary.py tests/test_extension.py \
        -m "gpu or not gpu" --junitxml "$RESULTS/gpu-tests-$DAY-$GPU.xml" 2>&1 | tail -40
      ;;
    micro)
      python -m pytest -q benchmarks --benchmark-json "$RESULTS/micro-$DAY-$GPU.json" \
        --benchmark-max-time=0.25 --benchmark-min-rounds=5 --benchmark-columns=median,iqr,rounds
      ;;
    boundary)
      python benchmarks/boundary_memory.py --output "$RESULTS/boundary-$DAY-$GPU.json"
      ;;
    e2e-g1|e2e-g2|e2e-g3|e2e-levers)
      local file="e2e-$DAY-$GPU.json"
      if [ "$RESULTS" != benchmarks/results ] && [ -f "benchmarks/results/$file" ] && [ ! -f "$RESULTS/$file" ]; then
        cp "benchmarks/results/$file" "$RESULTS/$file"  # continue the file an earlier command wrote
      fi
      OUT="$RESULTS/$file" bash benchmarks/e2e/issue5.sh "${1#e2e-}"
      ;;
    *)
      echo "unknown stage $1: build-tests | micro | boundary | e2e-g1 | e2e-g2 | e2e-g3 | e2e-levers" >&2
      return 2
      ;;
  esac
}

install || { echo "install failed" >&2; exit 1; }
status=0
for name in "${@:-build-tests}"; do
  echo "=== $name (limit ${LIMIT} s) ==="
  start=$SECONDS
  export -f stage
  RESULTS=$RESULTS DAY=$DAY GPU=$GPU timeout --signal=INT --kill-after=20 "$LIMIT" bash -c "stage $name" || status=$?
  echo "=== $name: exit $status after $((SECONDS - start)) s ==="
done
exit $status
