"""`retrikt` command line: one command per pipeline stage (what dvc.yaml runs), plus `predict`.

No logic lives here, and nothing heavy is imported at start-up: each command imports its stage module
when it runs, so `retrikt --help` answers without importing torch. Every stage validates params.yaml
first; bad input ends with one line on stderr and a non-zero exit (2 for params, 1 for data/models).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from retrikt.paths import PARAMS_FILE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RetriKT: retrieval-based knowledge transfer, one command per DVC stage.")

ParamsOpt = typer.Option(PARAMS_FILE, "--params", help="params file")


def _fail(msg: str, code: int) -> None:
    typer.echo(f"retrikt: error: {msg}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _guard():
    """Turn a user error (:class:`retrikt.errors.UserError`) into one line + its exit code; any other
    exception is a bug and keeps its traceback."""
    from retrikt.errors import UserError

    try:
        yield
    except UserError as e:
        _fail(f"{e.prefix}{str(e).splitlines()[0] if str(e) else type(e).__name__}", e.exit_code)


def _setup(params_path: Path, seed: int | None = None):
    """Validate params, pin threads and the device (before any compute), quiet telemetry, configure logging, seed."""
    from retrikt.params import load_params
    from retrikt.tracking import disable_telemetry

    disable_telemetry()
    from retrikt.progress import configure as quiet_library_bars

    quiet_library_bars()  # before transformers/tqdm are imported: their own bars off a terminal
    params = load_params(params_path)
    from retrikt.params import check_against_models

    check_against_models(params)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from retrikt.device import resolve_device, set_threads
    from retrikt.seeding import seed_everything

    set_threads(params.threads)  # pinned before any compute: results depend on it
    device = resolve_device(params.device)  # a missing GPU stops here, before any compute
    logging.getLogger("retrikt.device").info("device: %s", device)
    seed_everything(params.seed if seed is None else seed)
    return params, device


def _stage(stage: str, fn: Callable, params_path: Path, task: str | None = None, *,
           run_seed: int | None = None, metrics=None, plots=None, variant: str | None = None, **kwargs):
    """Run ``fn(params, task, run=..., **kwargs)`` inside a tracked, guarded stage."""
    with _guard():
        params, device = _setup(params_path, run_seed)
        if task is not None:
            from retrikt.tasks import get_task

            get_task(task)
        from retrikt import paths
        from retrikt.tracking import StageRun

        sections = {"prepare": "data", "resolve_model": "models", "train_student": "student"}
        section = sections.get(stage, stage)
        logged = {"seed": params.seed if run_seed is None else run_seed}
        pdict = params.to_dict()
        if section in pdict:
            logged[section] = pdict[section]
        mpath = metrics if metrics is not None else (paths.metrics(task, stage) if task else None)
        tags = {"variant": variant} if variant else None
        from retrikt.device import execution_info

        with StageRun(stage, metrics_path=mpath, task=task, seed=logged["seed"], params=logged, plots=plots,
                      tags=tags, execution=execution_info(device), params_file=params_path) as run:
            args = (params, task) if task is not None else (params,)
            return fn(*args, run=run, **kwargs)


@app.command("check-params")
def check_params(params: Path = ParamsOpt,
                 out: Optional[Path] = typer.Option(None, help="also write 'ok' to this file (a DVC stamp)")) -> None:
    """Validate params.yaml (every key, type and range) and print OK."""
    with _guard():
        from retrikt.params import check_against_models, load_params

        check_against_models(load_params(params))  # student sizes vs the encoder, once it is resolved
    if out is not None:
        from retrikt.io import atomic_write_text

        atomic_write_text(out, "ok\n")  # same bytes every time: downstream stages see no change
    typer.echo("params OK")


@app.command("resolve-model")
def resolve_model(role: str = typer.Argument(..., help="a key of `models` in params, e.g. generator"),
                  params: Path = ParamsOpt) -> None:
    """Resolve a model spec (registry package / hub id / folder) into models/base/<role>."""

    def run_it(p, run):
        from retrikt.resolve_model import resolve

        out = resolve(p.model_spec(role), role)
        from retrikt.models import model_info

        run.set_metrics({"parameters": model_info(out).get("parameters", 0)})

    from retrikt import paths

    _stage("resolve_model", run_it, params, metrics=paths.model_metrics(role), variant=role)


@app.command()
def prepare(task: str, params: Path = ParamsOpt) -> None:
    """Prepare a task's train/validation splits into data/processed/<task>."""
    from retrikt import data

    _stage("prepare", lambda p, t, run: data.prepare(p, t, run=run), params, task)


def _call(target: str):
    """``"module:function"`` -> a stage callable, imported only when the stage runs."""

    def go(*args, **kwargs):
        import importlib

        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(*args, **kwargs)

    return go


def _task_stage(stage: str, target: str, task: str, params: Path, plots: tuple[str, ...] = ()) -> None:
    from retrikt import paths

    _stage(stage, _call(target), params, task, plots={n: paths.plot(task, n) for n in plots})


@app.command()
def teacher(task: str, params: Path = ParamsOpt) -> None:
    """Fine-tune the reward model / KD teacher on the task (models/<task>/teacher)."""
    _task_stage("teacher", "retrikt.teacher:teacher", task, params, ("teacher_curve",))


@app.command("prompt-tune")
def prompt_tune(task: str, params: Path = ParamsOpt) -> None:
    """Train the soft prompt (PEFT prompt tuning, generator frozen) (models/<task>/prompt)."""
    _task_stage("prompt_tune", "retrikt.prompt_tune:prompt_tune", task, params, ("prompt_tune_curve",))


@app.command()
def rl(task: str, params: Path = ParamsOpt) -> None:
    """RL-tune the soft prompt (rl.algorithm: ppo, grpo or rloo): reward-model confidence + diversity + length
    reward, KL to the step-1 prompt (models/<task>/rl)."""
    _task_stage("rl", "retrikt.rl.stage:rl", task, params, ("rl_curve",))


@app.command()
def generate(task: str, params: Path = ParamsOpt) -> None:
    """Sample, parse, dedupe, de-leak and soft-label the knowledge store (data/store/<task>)."""
    _task_stage("generate", "retrikt.generate:generate", task, params)


@app.command()
def index(task: str, params: Path = ParamsOpt) -> None:
    """Embed the store with the reward model and build its FAISS index."""
    _task_stage("index", "retrikt.index:index", task, params)


@app.command("train-student")
def train_student(task: str, method: str, layers: int, seed: int, params: Path = ParamsOpt) -> None:
    """Train one student: METHOD (finetune, vanilla_kd, mgskd, adkd, retrikt_kd, retrikt) with LAYERS layers."""
    from retrikt import paths
    from retrikt.errors import UnknownNameError
    from retrikt.methods import get_method

    try:
        get_method(method)
    except UnknownNameError as e:
        _fail(str(e), 2)
    name = f"{method}-L{layers}-s{seed}"
    _stage("train_student", _call("retrikt.distill.train:train_student"), params, task, run_seed=seed,
           metrics=paths.student_metrics(task, method, layers, seed), variant=name,
           plots={"student_curve": paths.plot(task, f"student_curve-{name}")},
           method=method, layers=layers, seed=seed)


@app.command()
def evaluate(params: Path = ParamsOpt) -> None:
    """One report over all tasks: reports/results.{json,md}, reports/metrics.json, significance, figures."""
    _stage("evaluate", _call("retrikt.evaluate:evaluate"), params)  # writes reports/metrics.json itself


@app.command()
def predict(task: str = typer.Argument(..., help="task name, e.g. cb"),
            fields: Optional[list[str]] = typer.Argument(None, help="field=value pairs, e.g. premise='...' "
                                                                    "hypothesis='...'"),
            student: Optional[Path] = typer.Option(None, help="student folder (default: retrikt-L2-s<first seed>)"),
            jsonl: Optional[Path] = typer.Option(None, help="a JSONL file of inputs instead of field=value"),
            k: Optional[int] = typer.Option(None, help="entries to retrieve (default: student.retrieval_top_k)"),
            as_json: bool = typer.Option(False, "--json", help="print JSON lines instead of text"),
            params: Path = ParamsOpt) -> None:
    """Predict with a trained student; a retrikt student also shows the top-k retrieved store entries."""
    import json as _json

    with _guard():
        from retrikt.params import load_params
        from retrikt.tasks import get_task

        get_task(task)
        p = load_params(params)
        from retrikt import paths
        from retrikt.device import resolve_device, set_threads
        from retrikt.predict import format_prediction, parse_cli_inputs
        from retrikt.retrieval import predict as run_predict

        folder = student or paths.student(task, "retrikt", p.student.layers[0], p.seeds[0])
        if not folder.exists():
            _fail(f"{folder}: no trained student (run `dvc repro` or pass --student)", 1)
        set_threads(p.threads)
        device = resolve_device(p.device)
        inputs = parse_cli_inputs(task, fields, jsonl)
        preds = run_predict(task, folder, inputs, p.student.retrieval_top_k if k is None else k, device)
    for pred in preds:
        typer.echo(_json.dumps(pred, ensure_ascii=False) if as_json else format_prediction(pred, task))


@app.command("registry-packages")
def registry_packages(params: Path = ParamsOpt) -> None:
    """Print `package==version` for every registry model in params (the set-up installs them --no-deps)."""
    with _guard():
        from retrikt.params import load_params

        p = load_params(params)
    specs = [p.models.generator, p.models.encoder, *p.models.extra.values()]
    typer.echo(" ".join(sorted({pin for s in specs for pin in s.registry_pins()})))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
