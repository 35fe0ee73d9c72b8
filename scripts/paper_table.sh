#!/usr/bin/env bash
# The paper's table, one task per call (README "The paper's table"):
#   bash scripts/paper_table.sh TASK [TRAIN_LIMIT] [SEEDS]     (defaults: 250 and 0,1,2; ~1.5 h per task here)
# In a throw-away clone of this checkout ($RETRIKT_TABLE_WORK, default /tmp/retrikt-table/TASK) it runs the
# whole DAG once as one DVC experiment, every default but
#   dvc exp run -S 'tasks=[TASK]' -S data.train_limit=TRAIN_LIMIT -S 'seeds=[SEEDS]' -S 'student.layers=[2,4]'
# (the store stages once, the 12 students per seed; the default run trains L=2 only), then copies the task's reports into
# reports/experiments/table/TASK/ and rebuilds reports/experiments/table/table.{md,json} over every task
# collected so far (scripts/paper_table.py). Commit that folder after each task: a fresh machine has no
# DVC cache or experiment refs. Uses this checkout's .venv (`bash scripts/run.sh test` or `repro` builds it).
# RETRIKT_TABLE_CACHE=DIR: use DIR as the clone's DVC cache (e.g. the .dvc/cache of a clone that ran the default
# `dvc repro` of this commit) and check out of it every output this commit's dvc.lock names: stages whose deps and
# params still match are up to date and skipped. CB at the whole train split (TRAIN_LIMIT null = the default run's
# data) then reuses the default run's store stages and its seed-0 L2 students. (DVC's run-cache cannot do this:
# every stage also writes a `cache: false` metrics file, which turns the run-cache off for it.)
set -euo pipefail
cd "$(dirname "$0")/.."
task=${1:?usage: bash scripts/paper_table.sh TASK [TRAIN_LIMIT] [SEEDS]}
limit=${2:-250}
seeds=${3:-0,1,2}
source scripts/experiment-lib.sh
work=${RETRIKT_TABLE_WORK:-/tmp/retrikt-table}/$task
# validate the overrides before the clone and the hours of compute
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
write_params params.yaml "$tmp/params.yaml" "tasks=[$task]" "data.train_limit=$limit" "seeds=[$seeds]" \
  "student.layers=[2,4]"
(cd "$tmp" && PYTHONPATH="$repo/src" retrikt check-params --params params.yaml --out ok >/dev/null) \
  || { echo "paper_table: the overrides for $task do not validate (above)" >&2; exit 2; }

fresh_clone "$work"
cd "$work"
if [ -n "${RETRIKT_TABLE_CACHE:-}" ]; then
  [ -d "$RETRIKT_TABLE_CACHE" ] || { echo "paper_table: RETRIKT_TABLE_CACHE=$RETRIKT_TABLE_CACHE is not a folder" >&2; exit 2; }
  dvc cache dir --local "$(cd "$RETRIKT_TABLE_CACHE" && pwd)"
  dvc checkout --allow-missing >/dev/null
fi
start=$(date +%s)
dvc exp run -S "tasks=[$task]" -S "data.train_limit=$limit" -S "seeds=[$seeds]" -S "student.layers=[2,4]" \
  ${mirror:+-S "data.mirror_dir=$mirror"}
end=$(date +%s)
cd "$repo"
python scripts/paper_table.py collect "$work" "$task" --started "$start" --ended "$end"
python scripts/paper_table.py table
