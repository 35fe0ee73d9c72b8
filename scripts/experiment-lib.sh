# Shared by the experiment scripts (ablate_retrieval.sh, paper_table.sh, probe_teachers.sh,
# probe_generate.sh, probe_rl_seeds.sh): source it from
# the checkout's root. It checks the .venv, puts it on PATH with the offline / no-telemetry environment, sets
# `repo` and `mirror` (data.mirror_dir made absolute: a relative one is relative to this checkout, not to a
# clone of it), and defines fresh_clone, enter_work_clone, split_overrides, resolve_models and write_params.
repo=$PWD
[ -x .venv/bin/retrikt ] || { echo "no .venv here: run 'bash scripts/run.sh test' once first" >&2; exit 2; }
export PATH="$repo/.venv/bin:$PATH" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true \
       TOKENIZERS_PARALLELISM=false GIT_PYTHON_REFRESH=quiet
mirror=$(python -c "import os, sys; from retrikt.io import load_yaml; m = load_yaml(open(sys.argv[1]).read())['data']['mirror_dir']
print(os.path.abspath(os.path.join(sys.argv[2], m)) if m else '')" "$repo/params.yaml" "$repo")

fresh_clone() {  # DIR: a new clone of this checkout's HEAD there (whatever was there is removed)
  rm -rf "$1"
  mkdir -p "$(dirname "$1")"
  git clone -q "$repo" "$1"
}

enter_work_clone() {  # OUT_DIR: out=OUT_DIR (absolute), a fresh clone in work=$out/work, entered, with the
  # stage commands importing its src/ (MLflow off) and its params.yaml kept as params.base.yaml
  mkdir -p "$1"
  out=$(cd "$1" && pwd)
  work="$out/work"
  fresh_clone "$work"
  export PYTHONPATH="$work/src" RETRIKT_MLFLOW=0
  cd "$work"
  cp params.yaml params.base.yaml
}

write_params() {  # SRC DST key=value ...: SRC with the dotted keys set to the YAML values, written to DST
  python - "$@" <<'PY'
import sys, yaml
from retrikt.io import load_yaml  # YAML 1.2 floats: 3e-5 is a number, as in `dvc exp run -S`
src, dst, *pairs = sys.argv[1:]
p = load_yaml(open(src).read())
for kv in pairs:
    key, value = kv.split("=", 1)
    *parents, leaf = key.split(".")
    node = p
    for k in parents:
        node = node[k]
    node[leaf] = load_yaml(value)
yaml.safe_dump(p, open(dst, "w"), sort_keys=False)
PY
}

split_overrides() {  # ARG...: items=(the ARGs before `--`), overrides=(the KEY=VALUE ARGs after it)
  items=(); overrides=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do items+=("$1"); shift; done
  if [ $# -gt 0 ]; then shift; overrides=("$@"); fi
}

resolve_models() {  # both base models into the current clone; their log in $out/setup.log
  : >"$out/setup.log"
  for model in encoder generator; do
    retrikt resolve-model $model >>"$out/setup.log" 2>&1 || { tail -5 "$out/setup.log" >&2; exit 1; }
  done
}
