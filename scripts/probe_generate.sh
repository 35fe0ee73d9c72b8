#!/usr/bin/env bash
# Does a short generate parse on every task? (issue: the knowledge store on every task; README "The store on every task")
#   bash scripts/probe_generate.sh OUT_DIR LIMIT SAMPLES TASK... [-- KEY=VALUE...]   (~3-6 min per task at 250 rows, 2 cores)
# In a throw-away clone of this checkout (OUT_DIR/work) it runs, per task with tasks=[TASK],
# data.train_limit=LIMIT and generate.num_samples=SAMPLES: prepare, teacher (1 epoch: it only soft-labels
# the store here, and the parse rate does not depend on it), prompt_tune (the default budget), rl with
# rl.enabled=false (generate samples from the step-1 prompt; RL would add ~7 min per task) and generate
# (every other param the default: max_new_tokens auto, T 0.8, forced field names). It writes one line per
# task to OUT_DIR/generate.tsv and keeps each task's generate.json as OUT_DIR/TASK.json (prompt_tune.json as
# OUT_DIR/TASK-prompt_tune.json). KEY=VALUE after `--` are further param overrides (e.g. prompt_tune.epochs=3),
# applied after the probe's own, to every task.
# Uses this checkout's .venv (`bash scripts/run.sh test` or `repro` builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/probe_generate.sh OUT_DIR LIMIT SAMPLES TASK... [-- KEY=VALUE...]"
out=${1:?$usage}; limit=${2:?$usage}; samples=${3:?$usage}
shift 3
source scripts/experiment-lib.sh
split_overrides "$@"
tasks=(${items[@]+"${items[@]}"})
[ ${#tasks[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }
enter_work_clone "$out"
resolve_models
printf "task\ttrain_rows\tsamples\tparse_rate\tentries\ttruncated\tmax_new_tokens\teos_rate\tcut_at_last_line\tunfinished\tmissing_field\textra_text\tinvalid\tunlocated_span\tseconds\n" > "$out/generate.tsv"
for task in "${tasks[@]}"; do
  write_params params.base.yaml params.yaml "tasks=[$task]" "data.train_limit=$limit" \
    "generate.num_samples=$samples" "teacher.epochs=1" "rl.enabled=false" "generate.min_entries=1" \
    ${mirror:+"data.mirror_dir=$mirror"} ${overrides[@]+"${overrides[@]}"}
  retrikt check-params --out data/params.ok >/dev/null
  echo "== $task (train_limit $limit, $samples samples)" >&2
  start=$(date +%s)
  for step in prepare teacher prompt-tune rl generate; do
    retrikt $step "$task" >"$out/$task.log" 2>&1 || { tail -5 "$out/$task.log" >&2; exit 1; }
  done
  cp "reports/metrics/$task/generate.json" "$out/$task.json"
  cp "reports/metrics/$task/prompt_tune.json" "$out/$task-prompt_tune.json"
  python - "$task" "$(( $(date +%s) - start ))" >>"$out/generate.tsv" <<'PY'
import sys
from retrikt import paths
from retrikt.io import read_json, read_jsonl
name, seconds = sys.argv[1:]
g = read_json(paths.metrics(name, "generate"))
f = g["parse_failures"]
rows = len(read_jsonl(paths.split_file(name, "train")))
print(f"{name}\t{rows}\t{g['samples']}\t{g['parse_rate']:.3f}\t{g['size']}\t{g['truncated_in_store']}\t{g['max_new_tokens']}\t"
      f"{g['eos_rate']:.3f}\t{g['cut_at_last_line']}\t{f['unfinished']}\t{f['missing_field']}\t{f['extra_text']}\t"
      f"{f['invalid']}\t{f['unlocated_span']}\t{seconds}")
PY
  tail -1 "$out/generate.tsv" >&2
done
