#!/usr/bin/env bash
# Which tasks can the default teacher learn at a train_limit? (README "The paper's table": a task belongs in
# the table only if its teacher clearly beats the majority class)
#   bash scripts/probe_teachers.sh OUT_DIR LIMIT TASK... [-- KEY=VALUE...]   (~1-3 min per task at 250 rows, 2 cores)
# In a throw-away clone of this checkout (OUT_DIR/work) it runs `prepare` and `teacher` per task with
# tasks=[TASK] and data.train_limit=LIMIT (every other param the default, or as KEY=VALUE sets it: e.g.
# teacher.model=mpnet teacher.lr=3e-5 'models.mpnet={...}'), and writes one line per task to
# OUT_DIR/teachers.tsv: the primary metric of the teacher and of the majority class on validation, and
# seconds (the overrides to OUT_DIR/overrides.txt).
# Uses this checkout's .venv (`bash scripts/run.sh test` or `repro` builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/probe_teachers.sh OUT_DIR LIMIT TASK... [-- KEY=VALUE...]"
out=${1:?$usage}
limit=${2:?$usage}
shift 2
source scripts/experiment-lib.sh
split_overrides "$@"
[ ${#items[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }
enter_work_clone "$out"
if [ ${#overrides[@]} -gt 0 ]; then
  write_params params.base.yaml params.base.yaml "${overrides[@]}"
fi
printf "%s\n" "${overrides[@]}" > "$out/overrides.txt"
cp params.base.yaml params.yaml
retrikt check-params --out data/params.ok >/dev/null
teacher_model=$(python -c "from retrikt.io import load_yaml; print(load_yaml(open('params.yaml').read())['teacher']['model'])")
retrikt resolve-model "$teacher_model" >"$out/setup.log" 2>&1 || { tail -5 "$out/setup.log" >&2; exit 1; }
printf "task\ttrain_limit\tmetric\tteacher\tmajority\tteacher_minus_majority\tseconds\n" > "$out/teachers.tsv"
for task in "${items[@]}"; do
  write_params params.base.yaml params.yaml "tasks=[$task]" "data.train_limit=$limit" \
    ${mirror:+"data.mirror_dir=$mirror"}
  retrikt check-params --out data/params.ok >/dev/null
  echo "== $task (train_limit $limit)" >&2
  start=$(date +%s)
  for step in prepare teacher; do
    retrikt $step "$task" >"$out/$task.log" 2>&1 || { tail -5 "$out/$task.log" >&2; exit 1; }
  done
  python - "$task" "$limit" "$(( $(date +%s) - start ))" >>"$out/teachers.tsv" <<'EOF'
import sys
import numpy as np
from retrikt import paths
from retrikt.io import read_json, read_jsonl
from retrikt.report.stats import majority_class
from retrikt.tasks import get_task
name, limit, seconds = sys.argv[1:]
task = get_task(name)
metric = task.metrics[0]
teacher = read_json(paths.metrics(name, "teacher"))[metric]
train = read_jsonl(paths.split_file(name, "train"))
val = [r["label"] for r in read_jsonl(paths.split_file(name, "validation"))]
cls = majority_class([r["label"] for r in train], task.num_labels)
majority = task.compute_metrics(val, np.full(len(val), cls))[metric]
print(f"{name}\t{limit}\t{metric}\t{teacher:.4f}\t{majority:.4f}\t{teacher - majority:+.4f}\t{seconds}")
EOF
  tail -1 "$out/teachers.tsv" >&2
done
