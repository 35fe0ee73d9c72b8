"""Every registry task runs through the whole DAG by changing `tasks` only (issue: experiments).

For each task: a throw-away DVC project with this repository's dvc.yaml, src/ and params.yaml, where
params differ from the defaults only in `tasks: [<task>]` and in scale (tiny local models, a tiny
mirror, one epoch). DVC itself resolves the stages (its own graph, dependencies first); each stage's
command is then run in-process through the `retrikt` CLI, after checking that every file dependency
the stage declares exists, and followed by a check that every output it declares was written. So the
test fails if dvc.yaml and the code disagree for any task (a missing dep, an output never written),
or if any stage cannot handle the task's fields, labels, serialisation or metrics.

The generator is the tiny causal LM fitted (a few seconds) to write a few of the task's rows that are
in neither split, so its samples parse into a store.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retrikt.io import read_json, read_jsonl
from retrikt.tasks import TASKS, get_task

from .conftest import FIXTURES, MIRROR, REPO, fit_tiny_generator, tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: ~6 s a task

FIXTURE_TASKS = {"boolq", "wic"}  # not in the mirror: our hand-written rows in the HF schema


def _rows(task_name: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, generator rows): short rows, disjoint, each label in the generator rows."""
    task = get_task(task_name)
    if task_name in FIXTURE_TASKS:
        rows = read_jsonl(FIXTURES / f"{task_name}.jsonl")
        n = len(rows)
        return rows[: n // 2], rows[n // 2: n - 4], rows[n - 4:]
    folder = MIRROR / task.mirror_dir
    if not (folder / "train.jsonl").exists():
        pytest.skip(f"GLUE mirror has no {task_name} at {folder}")

    def head(split: str, n: int) -> list[dict]:
        with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for _, line in zip(range(n), f)]
        return sorted(rows, key=lambda r: len(task.serialise(r)))  # short rows: fast tiny models

    pool = head("train", 400)
    gen: list[dict] = []
    for label in range(task.num_labels):
        gen += [r for r in pool if r["label"] == label][:2]
    rest = [r for r in pool if r not in gen]
    return rest[:12], head("validation", 200)[:6], gen


def _project(root: Path, task_name: str, generator: Path, encoder: Path, source: str = "llm") -> Path:
    """dvc.yaml, src/ and params.yaml of this repository; params: `tasks` and scale only (and for
    ``source="oracle"``: ``generate.source`` and a ``data.train_limit`` that leaves spare train rows;
    for ``"generator-teacher"``: the generator as the teacher, reward model and KD teacher)."""
    train, validation, _ = _rows(task_name)
    mirror = root / "mirror" / get_task(task_name).mirror_dir
    mirror.mkdir(parents=True)
    for split, rows in (("train", train), ("validation", validation)):
        (mirror / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proj = root / "project"
    proj.mkdir()
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["tasks"] = [task_name]
    p["threads"] = 1  # tiny models: a second thread only thrashes
    p["data"]["mirror_dir"] = str(root / "mirror")
    tiny_models(p, encoder=encoder, generator=generator)
    p["teacher"].update(epochs=1, batch_size=8, max_length=64)
    p["prompt_tune"].update(num_virtual_tokens=2, epochs=6, batch_size=4, max_length=192, train_limit=8)
    p["rl"].update(updates=1, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=160, eval_samples=2)
    p["generate"].update(num_samples=32, batch_size=16, max_new_tokens=160, min_entries=2)
    p["student"].update(layers=[2], epochs=1, batch_size=8, max_length=64, retrieval_candidates=4,
                        retrieval_top_k=2)
    p["evaluate"]["bootstrap_samples"] = 50
    if source == "oracle":
        p["data"]["train_limit"] = 6  # of 12: the other 6 are the oracle store
        p["generate"]["source"] = "oracle"
    if source == "generator-teacher":  # README "Choosing the teacher": SmolLM2 as a sequence classifier
        p["teacher"].update(model="generator", pooling="cls")
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return proj


def _stages_in_order(proj: Path) -> list:
    """DVC's own resolution of dvc.yaml for these params, dependencies first."""
    import networkx as nx
    from dvc.repo import Repo

    Repo.init(str(proj), no_scm=True)
    with Repo(str(proj)) as repo:
        return list(nx.dfs_postorder_nodes(repo.index.graph))


def _split_env(cmd: str) -> tuple[dict[str, str], list[str]]:
    """``NAME=value ... program args`` -> ({NAME: value}, [program, args...])."""
    words = shlex.split(cmd)
    n = next(i for i, w in enumerate(words) if "=" not in w)
    return dict(w.split("=", 1) for w in words[:n]), words[n:]


@pytest.mark.parametrize(("task_name", "source"), [(t, "llm") for t in sorted(TASKS)] + [("rte", "oracle"),
                                                                                ("cb", "generator-teacher")])
def test_task_runs_through_the_whole_dag(task_name, source, tmp_path, tiny_causal_dir, tiny_encoder_dir,
                                         monkeypatch):
    from typer.testing import CliRunner

    from retrikt.cli import app

    _, _, gen_rows = _rows(task_name)
    generator = fit_tiny_generator(tiny_causal_dir, get_task(task_name), gen_rows, tmp_path / "generator", 192, 120)
    proj = _project(tmp_path, task_name, generator, tiny_encoder_dir, source)
    stages = _stages_in_order(proj)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("RETRIKT_MLFLOW", "0")  # MLflow has its own tests; here it would only cost time

    names = [s.addressing for s in stages]
    assert names[0] == "check_params" and names[-1] == "evaluate"
    assert f"train_store_student@{task_name}-retrikt-2-0" in names and f"train_baseline@{task_name}-adkd-2-0" in names
    runner = CliRunner()
    for stage in stages:
        missing = [str(d.def_path) for d in stage.deps
                   if not getattr(d, "params", None) and not Path(d.def_path).exists()]
        assert not missing, f"{stage.addressing}: declared dependencies missing before it runs: {missing}"
        env, argv = _split_env(stage.cmd)
        assert env == {"PYTHONPATH": "src"} and argv[0] == "retrikt", stage.cmd  # this checkout's code
        result = runner.invoke(app, argv[1:])
        assert result.exit_code == 0, f"{stage.addressing}: `{stage.cmd}` exit {result.exit_code}\n{result.output}" \
                                      f"\n{result.exception!r}"
        unwritten = [str(o.def_path) for o in stage.outs if not Path(o.def_path).exists()]
        assert not unwritten, f"{stage.addressing}: declared outputs not written: {unwritten}"

    results = read_json(Path("reports/results.json"))
    assert task_name in json.dumps(results)
    report = Path("reports/results.md").read_text()
    for method in ("teacher", "finetune", "vanilla_kd", "mgskd", "adkd", "retrikt_kd", "retrikt"):
        assert method in report, method
    store = read_json(Path(f"reports/metrics/{task_name}/generate.json"))
    assert store["size"] >= 2
    if source == "generator-teacher":
        assert read_json(Path(f"models/{task_name}/teacher/retrikt_classifier.json"))["base"] == "generator"
    if source == "oracle":  # the store is the spare train rows, none of them in the training subset
        assert store["prompt"] == "oracle" and store["samples"] == 6
        from retrikt import paths

        task = get_task(task_name)
        train_texts = {task.serialise(r) for r in read_jsonl(paths.split_file(task_name, "train"))}
        store_texts = {e["text"] for e in read_jsonl(paths.store_entries(task_name))}
        assert store_texts <= {task.serialise(r) for r in read_jsonl(paths.spare_file(task_name))}
        assert not train_texts & store_texts

    # `dvc plots show` renders every curve the stages declare and every figure evaluate drew
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "-o", str(tmp_path / "html")],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    plots = json.loads(shown.stdout)
    assert not plots.get("errors"), plots["errors"]
    rendered = {k: v for k, v in plots["data"].items() if v}
    t = task_name
    for curve in ("teacher_curve", "prompt_tune_curve", "rl_curve", "student_curve-retrikt-L2-s0",
                  "student_curve-adkd-L2-s0"):
        assert rendered[f"reports/plots/{t}/{curve}.json"][0]["type"] == "vega", curve
    for figure in ("methods", "cost", "confusion", "store", "retrieval", "rl", "learning_curves"):
        assert rendered[f"reports/figures/{t}/{figure}.png"][0]["type"] == "image", figure
    assert rendered["reports/figures/forest.png"][0]["type"] == "image"
