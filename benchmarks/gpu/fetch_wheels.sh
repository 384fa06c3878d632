#!/usr/bin/env bash
# The wheels the GPU machine lacks for benchmarks/gpu_session.sh, for its Python 3.12 on x86-64 Linux, into .whl/:
#   bash benchmarks/gpu/fetch_wheels.sh [DEST]      (default .whl; needs the package registry)
# Then name .whl in the device tool's carry; gpu_session.sh installs whatever it finds there with
# pip --no-index --no-deps --target <scratch> (the machine's torch is left alone). The machine already has torch,
# triton, transformers, accelerate, peft, pytest, pytest-xdist, pytest-timeout and ninja (as last seen), and the
# session's parts import neither datasets, gguf nor trl. A missing wheel is no error there: the part that needs
# it records "skipped" with the reason.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
LIMIT_MB=60  # the device tool carries 64 MiB in all, the working tree included
WHEELS=(
  "liger-kernel==0.8.5"  # hf+liger (e2e, capped) and Liger's fused linear cross-entropy (micro); pure Python
)
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "$spec"
done
if [[ $DEST == .whl && -d .git ]] && ! git check-ignore -q .whl/x.whl; then
  echo '/.whl/' >>.git/info/exclude  # carried, never committed
fi
ls -l "$DEST"
mb=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $mb MiB"
if ((mb > LIMIT_MB)); then
  echo "more than $LIMIT_MB MiB: the device tool carries 64 MiB in all" >&2
  exit 1
fi
