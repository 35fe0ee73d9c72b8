#!/usr/bin/env bash
# Does RL improve on the step-1 prompt, seed after seed? (issue: knowledge extraction, item 6; README "RL against the step-1 prompt, seed by seed")
#   bash scripts/probe_rl_seeds.sh OUT_DIR SEED... [-- KEY=VALUE...]   (~25 min per seed on CB, 2 cores)
# In a throw-away clone of this checkout (OUT_DIR/work) it runs, per seed with seed=SEED and every other param
# the default (KEY=VALUE after `--` override them): prepare, teacher, prompt_tune and rl, i.e. what
# `dvc exp run -S seed=SEED rl@TASK` runs. The rl stage scores the same seeded, label-balanced held-out
# rollouts (rl.eval_samples) from the step-1 prompt and from the RL prompt: reward, parse rate, reward-model
# confidence and agreement, self-BLEU. One line per seed goes to OUT_DIR/rl.tsv; each seed's rl.json is kept
# as OUT_DIR/rl-sSEED.json. The task is the first of params.yaml's `tasks`.
# Uses this checkout's .venv (`bash scripts/run.sh test` or `repro` builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/probe_rl_seeds.sh OUT_DIR SEED... [-- KEY=VALUE...]"
out=${1:?$usage}
shift
source scripts/experiment-lib.sh
split_overrides "$@"
seeds=(${items[@]+"${items[@]}"})
[ ${#seeds[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }
enter_work_clone "$out"
resolve_models
printf "seed\tkept\treward_before\treward_after\tparse_before\tparse_after\tconfidence_before\tconfidence_after\tagreement_before\tagreement_after\tself_bleu_before\tself_bleu_after\tseconds\n" > "$out/rl.tsv"
for seed in "${seeds[@]}"; do
  write_params params.base.yaml params.yaml "seed=$seed" "seeds=[$seed]" \
    ${mirror:+"data.mirror_dir=$mirror"} ${overrides[@]+"${overrides[@]}"}
  retrikt check-params --out data/params.ok >/dev/null
  task=$(python -c "from retrikt.params import load_params; print(load_params().tasks[0])")
  echo "== seed $seed ($task)" >&2
  start=$(date +%s)
  for step in prepare teacher prompt-tune rl; do
    retrikt $step "$task" >"$out/s$seed.log" 2>&1 || { tail -5 "$out/s$seed.log" >&2; exit 1; }
  done
  cp "reports/metrics/$task/rl.json" "$out/rl-s$seed.json"
  python - "$task" "$seed" "$(( $(date +%s) - start ))" >>"$out/rl.tsv" <<'PY'
import sys
from retrikt import paths
from retrikt.io import read_json
task, seed, seconds = sys.argv[1:]
r = read_json(paths.metrics(task, "rl"))
cells = [seed, str(r["accepted"])]
for k in ("reward", "parse_rate", "confidence", "rm_agreement", "self_bleu"):
    cells += [f"{r[k + '_before']:.3f}", f"{r[k + '_after']:.3f}"]
print("\t".join(cells + [seconds]))
PY
  tail -1 "$out/rl.tsv" >&2
done
