#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent GPU machine whose image has PyTorch but not Ray or DeepSpeed.
#
#   bash benchmarks/gpu_check.sh prepare      # here, with the project's venv: .gpu/ (git-ignored) = DeepSpeed as installed
#                                             # in .venv plus the cp312 wheels of what it needs that the image lacks (~14 MB)
#   bash benchmarks/gpu_check.sh [OUT_DIR]    # there, with .gpu carried: installs .gpu into /tmp/gpu_site, runs the check
#                                             # (under 8 minutes on an H200), OUT_DIR/gpu_check.json and gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  python=.venv/bin/python
  # find_spec / metadata, not an import: importing DeepSpeed prints to stdout
  site=$($python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("deepspeed").origin).parent.parent)')
  version=$($python -c 'from importlib.metadata import version; print(version("deepspeed"))')
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/site
  grep -qx '/.gpu/' "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$(git rev-parse --git-dir)/info/exclude"
  # DeepSpeed publishes no wheel (an sdist, built at install): carry the pure-Python package as installed here.
  cp -r "$site/deepspeed" "$site/deepspeed-$version.dist-info" .gpu/site/
  find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
  pins=$($python - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "hjson")))
EOF
)
  # shellcheck disable=SC2086
  $python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl $pins
  du -sh .gpu
  exit 0
fi

out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
if [ -d .gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site .gpu/whl/*.whl
  cp -r .gpu/site/. /tmp/gpu_site/
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_check.log"
set -o pipefail
PYTHONUNBUFFERED=1 timeout 450 python3 benchmarks/gpu_check.py --out "$out" 2>&1 | tee -a "$out/gpu_check.log"
