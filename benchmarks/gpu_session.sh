#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit a 10-minute command on an H100 / H200:
#   bash benchmarks/gpu_session.sh build-tests   # build lopt_kernels._C, run the `gpu` tests
#   bash benchmarks/gpu_session.sh micro         # kernel microbenchmarks (pytest-benchmark JSON)
#   bash benchmarks/gpu_session.sh boundary      # the boundary-memory measurement (issue 4)
#   bash benchmarks/gpu_session.sh e2e-g1|e2e-g2|e2e-g3|e2e-levers   # the end-to-end goals (issue 5)
# Results land in $OUT when set (the device tool's output folder), else in benchmarks/results/;
# commit them under benchmarks/results/. The install leaves the machine's torch alone.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
DAY=$(date +%F)
GPU=$(python -c "import torch; n=torch.cuda.get_device_name(0).lower(); print(next((k for k in ('h200','h100') if k in n), 'gpu'))")
export PYTHONUNBUFFERED=1

install() {
  if [ -d .whl ]; then  # wheels carried from the developer machine (datasets, liger-kernel, ...)
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  LOPT_REQUIRE_CUDA_BUILD=1 python -m pip install -q --no-deps --no-build-isolation -e .
  python -c "import lopt_kernels; assert lopt_kernels.has_extension(); print('lopt_kernels._C loaded')"
}

case "${1:-build-tests}" in
  build-tests)
    install
    python -m pytest -q -m gpu tests --junitxml "$RESULTS/gpu-tests-$DAY-$GPU.xml" 2>&1 | tee "$RESULTS/gpu-tests-$DAY-$GPU.log"
    ;;
  micro)
    install
    python -m pytest -q benchmarks --benchmark-json "$RESULTS/micro-$DAY-$GPU.json" --benchmark-columns=median,iqr,rounds
    ;;
  boundary)
    install
    python benchmarks/boundary_memory.py --output "$RESULTS/boundary-$DAY-$GPU.json"
    ;;
  e2e-g1|e2e-g2|e2e-g3|e2e-levers)
    install
    OUT="$RESULTS/e2e-$DAY-$GPU.json" bash benchmarks/e2e/issue5.sh "${1#e2e-}"
    ;;
  *)
    echo "unknown stage $1: build-tests | micro | boundary | e2e-g1 | e2e-g2 | e2e-g3 | e2e-levers" >&2
    exit 2
    ;;
esac
