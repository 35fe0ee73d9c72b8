#!/usr/bin/env bash
# The retrieval student's ablation on an oracle store (README "The retrieval student"), re-made:
#   bash scripts/ablate_retrieval.sh OUT_DIR [TASK] [TRAIN_LIMIT]      (defaults: sst2 250; ~25 min, 2 cores)
# In a throw-away clone of this checkout (OUT_DIR/work) it sets tasks=[TASK], data.train_limit and
# generate.source=oracle, runs the stages up to `index` once (prepare, teacher, oracle store, index:
# no LLM), then trains the `retrikt` student once per variant below with the same CLI command the
# train_store_student stage runs, each variant's params written into that clone's params.yaml.
# Every variant's metrics land in OUT_DIR/<variant>.json and one line each in OUT_DIR/results.tsv.
# Also copied: the teacher, generate and index metrics (index.json: rm_retrieval, the retrieval ceiling).
# Uses this checkout's .venv (`bash scripts/run.sh test` or `repro` builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/ablate_retrieval.sh OUT_DIR [TASK] [TRAIN_LIMIT]}
task=${2:-sst2}
limit=${3:-250}
source scripts/experiment-lib.sh
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
fresh_clone "$work"
export PYTHONPATH="$work/src"
cd "$work"

set_params() {  # key=value ... (dotted keys, YAML values) into params.yaml, from a pristine copy
  write_params params.base.yaml params.yaml "$@"
  retrikt check-params --out data/params.ok >/dev/null
}

cp params.yaml params.base.yaml
set_params "tasks=[$task]" "data.train_limit=$limit" "generate.source=oracle" ${mirror:+"data.mirror_dir=$mirror"}
cp params.yaml params.base.yaml
for step in "resolve-model encoder" "resolve-model generator" "prepare $task" "teacher $task" \
            "generate $task" "index $task"; do
  echo "== retrikt $step" >&2
  retrikt $step >"$out/setup.log" 2>&1 || { tail -5 "$out/setup.log" >&2; exit 1; }
done

# name layers seed overrides...
variants=(
  "R0-L2-s0 2 0 student.retrieval_negatives=0"
  "R0-L2-s1 2 1 student.retrieval_negatives=0"
  "R0-L2-s2 2 2 student.retrieval_negatives=0"
  "R64-L2-s0 2 0 student.retrieval_negatives=64"
  "R256-L2-s0 2 0 student.retrieval_negatives=256"
  "R256-L2-s1 2 1 student.retrieval_negatives=256"
  "R256-L2-s2 2 2 student.retrieval_negatives=256"
  "R1024-L2-s0 2 0 student.retrieval_negatives=1024"
  "R0-L4-s0 4 0 student.retrieval_negatives=0"
  "R256-L4-s0 4 0 student.retrieval_negatives=256"
  "R256-trainq-L2-s0 2 0 student.retrieval_negatives=256 student.retrieval_queries=train"
  "R256-ce1-L2-s0 2 0 student.retrieval_negatives=256 student.retrieval_ce_weight=1.0"
  "R0-3ep-L2-s0 2 0 student.retrieval_negatives=0 student.store_epochs=3"
)
printf "variant\tlayers\tseed\toverrides\taccuracy\tseconds\n" > "$out/results.tsv"
for v in "${variants[@]}"; do
  read -r name layers seed overrides <<<"$v"
  set_params $overrides
  echo "== $name ($overrides)" >&2
  start=$(date +%s)
  retrikt train-student "$task" retrikt "$layers" "$seed" >"$out/$name.log" 2>&1 \
    || { tail -5 "$out/$name.log" >&2; exit 1; }
  cp "reports/metrics/$task/students/retrikt-L$layers-s$seed.json" "$out/$name.json"
  acc=$(python -c "import json,sys; print(round(json.load(open(sys.argv[1]))['accuracy'], 4))" "$out/$name.json")
  printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$name" "$layers" "$seed" "$overrides" "$acc" "$(( $(date +%s) - start ))" \
    | tee -a "$out/results.tsv"
done
cp "reports/metrics/$task/teacher.json" "$out/teacher.json"
cp "reports/metrics/$task/generate.json" "$out/generate.json"
# index.json carries rm_retrieval: the reward model itself as the retriever, the ceiling of a student
# that imitates its similarities (computed by the index stage)
cp "reports/metrics/$task/index.json" "$out/index.json"
python -c "import json, sys; print('reward model as the retriever:', json.load(open(sys.argv[1]))['rm_retrieval'])" \
  "$out/index.json"
