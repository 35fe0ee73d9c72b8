#!/usr/bin/env bash
# Refresh requirements.lock: every transitive dependency of pyproject.toml (+ the test extra), pinned,
# for Python 3.11 on x86-64 Linux, with torch's CPU build. Run after changing a pin in pyproject.toml.
#
# torch: the lock must never pull CUDA wheels. PyPI's torch 2.13.0 for Linux depends on ~15 nvidia-*
# packages and triton (several GB); the CPU build (torch-2.13.0+cpu, no such dependencies) is the file
# in $TORCH_WHEELS (default /opt/wheels, where this machine kind keeps it; elsewhere point it at a
# folder holding the file from the PyTorch CPU index). uv resolves against that folder, so the lock pins
# torch==2.13.0+cpu and no nvidia-* package; this script refuses a lock that has one.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${TORCH_WHEELS:-/opt/wheels}
ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 || { echo "no torch-2.13.0+cpu wheel in $wheels (set TORCH_WHEELS)" >&2; exit 2; }
uv=${UV:-}
if [ -z "$uv" ]; then  # uv in a throw-away tool venv, pinned, outside the project's .venv
  tool=${TMPDIR:-/tmp}/retrikt-uv-0.13.8
  [ -x "$tool/bin/uv" ] || { python3 -m venv "$tool" && "$tool/bin/pip" install -q uv==0.13.8; }
  uv=$tool/bin/uv
fi
# uv keeps the versions of the current lock wherever they still satisfy pyproject.toml (-o file = preferences)
[ -f requirements.lock ] && cp requirements.lock requirements.lock.tmp
"$uv" pip compile pyproject.toml --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "$wheels" --no-emit-find-links --custom-compile-command "bash scripts/lock.sh" \
  --quiet -o requirements.lock.tmp
if grep -qiE '^(nvidia-|triton==)' requirements.lock.tmp || ! grep -q '^torch==2.13.0+cpu$' requirements.lock.tmp; then
  echo "lock refused: it pins CUDA packages or not torch==2.13.0+cpu" >&2
  rm -f requirements.lock.tmp; exit 1
fi
mv requirements.lock.tmp requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
