"""params ``device``: validated like every key, resolved by each stage, handed to every model loader
(no process-wide device: loaders take ``device``, default the CPU).

There is no GPU on the development machine: placement is checked with torch's ``meta`` device (a
model can be moved there, nothing computed), and the CUDA test at the end runs only where torch
sees a GPU.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import yaml

from retrikt import device
from retrikt.classifier import Classifier, train_classifier
from retrikt.llm import attach_prompt, nll, sample_full, source_text, target_text
from retrikt.models import load_generator
from retrikt.params import ParamsError, parse_params
from retrikt.tasks import get_task

from .conftest import REPO

RAW = yaml.safe_load((REPO / "params.yaml").read_text())
ROWS = [{"premise": "the cat sat on the mat .", "hypothesis": f"a cat is {w} .", "label": i % 3}
        for i, w in enumerate(["yes", "no", "movie", "true", "false", "film"])]
NO_CUDA = not torch.cuda.is_available()

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(value):
    return parse_params({**copy.deepcopy(RAW), "device": value})


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_good_values(value):
    assert _params(value).device == value


@pytest.mark.parametrize("value,expect", [
    ("gpu", "device: 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("cuda:", "device: 'cuda:' is not one of auto, cpu, cuda, cuda:N"),
    ("CUDA", "device: 'CUDA' is not one of auto, cpu, cuda, cuda:N"),
    ("cuda:x", "device: 'cuda:x' is not one of auto, cpu, cuda, cuda:N"),
    (0, "device: expected a string, got 0"),
])
def test_bad_values_are_one_line(value, expect):
    with pytest.raises(ParamsError) as e:
        _params(value)
    assert str(e.value) == expect


def test_default_is_auto_and_params_yaml_must_set_it():
    assert RAW["device"] == "auto"
    raw = copy.deepcopy(RAW)
    del raw["device"]
    with pytest.raises(ParamsError, match=r"^device: missing"):
        parse_params(raw)


def test_loaders_default_to_the_cpu(tiny_encoder_dir, tiny_causal_dir):
    clf = Classifier.from_base(tiny_encoder_dir, get_task("cb"), max_length=32)
    generator, _ = load_generator(tiny_causal_dir)
    for model in (clf.model, generator):
        assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_auto_and_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto") == torch.device("cpu")
    assert device.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParamsError) as e:
        device.resolve_device(name)
    msg = str(e.value)
    assert msg.startswith(f"device: '{name}' requested, but torch sees no CUDA GPU") and "\n" not in msg


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_stage_with_cuda_stops_before_compute(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**RAW, "device": "cuda"}, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "retrikt.cli", "prepare", "cb", "--params", str(params)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "retrikt: error: params: device: 'cuda' requested, but torch sees no CUDA GPU")
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------ placement (meta device)
def test_loaders_put_models_on_the_given_device(tmp_path, tiny_encoder_dir, tiny_causal_dir):
    task, meta = get_task("cb"), torch.device("meta")
    Classifier.from_base(tiny_encoder_dir, task, max_length=32).save(tmp_path / "clf")  # built on the CPU
    fresh = Classifier.from_base(tiny_encoder_dir, task, max_length=32, num_layers=2, device=meta)
    loaded = Classifier.load(tmp_path / "clf", meta)
    generator, _ = load_generator(tiny_causal_dir, meta)
    for model in (fresh.model, loaded.model, generator):
        assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {t.device.type for t in loaded.encode(ROWS).values()} == {"meta"}  # inputs follow the model


def test_stages_hand_params_device_to_the_loaders(monkeypatch, tiny_encoder_dir):
    """The teacher stage builds its classifier on params ``device`` (resolved), not on a global."""
    from retrikt import teacher as teacher_stage

    seen = {}

    def record(*args, device="cpu", **kwargs):
        seen["device"] = device
        raise RuntimeError("stop")  # nothing to train: the device is what this test reads

    monkeypatch.setattr(teacher_stage.Classifier, "from_base", record)
    monkeypatch.setattr(teacher_stage, "read_jsonl", lambda path: ROWS)
    monkeypatch.setattr(teacher_stage, "resolve_device", lambda name: torch.device("meta") if name == "auto" else None)
    with pytest.raises(RuntimeError, match="stop"):
        teacher_stage.teacher(_params("auto"), "cb", run=None)
    assert seen["device"] == torch.device("meta")


def test_classifier_does_not_change_the_tokenizer_it_is_given(tiny_causal_dir):
    """A decoder-only tokenizer has no pad token: the loaders give it EOS; the constructor refuses
    one without, instead of changing the caller's object."""
    import transformers

    from retrikt.classifier import _with_padding

    task = get_task("cb")
    clf = Classifier.from_base(tiny_causal_dir, task, max_length=32)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_causal_dir)
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        Classifier(clf.model, tok, task)
    assert tok.pad_token is None
    _, padded = _with_padding(clf.model, tok)  # what the loaders do to the tokenizer they load
    assert padded.pad_token == tok.eos_token


def test_trl_trains_where_the_model_is(monkeypatch, tmp_path):
    """trl's Trainer would move the model to a visible GPU by itself; a CPU model must stay there."""
    import trl

    from retrikt.rl.trl_algos import TrlConfig, train_with_trl

    from .test_rl_ppo import CONDITIONS, good_fraction, rl_params, tiny_causal_peft, tiny_tokenizer

    seen = {}

    class Recorder:
        def __init__(self, args, **_):
            seen["use_cpu"] = args.use_cpu
            self.state = type("State", (), {"log_history": []})()

        def train(self):
            pass

    monkeypatch.setattr(trl, "GRPOTrainer", Recorder)
    tok = tiny_tokenizer()
    train_with_trl("grpo", tiny_causal_peft(len(tok)), tok, CONDITIONS, good_fraction,
                   TrlConfig(rl_params(updates=1, batch_size=4), 0, output_dir=str(tmp_path)))
    assert seen["use_cpu"] is True


# ------------------------------------------------------------------------------------ on a GPU
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_train_and_sample_on_cuda(tiny_encoder_dir, tiny_causal_dir, tiny_seq2seq_dir):
    from retrikt.rl.ppo import SoftPromptPPO

    from .test_rl_ppo import CONDITIONS, good_fraction, ppo_config, tiny_causal_peft, tiny_tokenizer

    cuda = device.resolve_device("cuda")
    assert cuda.type == "cuda"
    task = get_task("cb")
    clf = Classifier.from_base(tiny_encoder_dir, task, max_length=32, num_layers=2, device=cuda)
    assert clf.model.device.type == "cuda"
    history = train_classifier(clf, ROWS, ROWS, epochs=2, lr=1e-3, batch_size=4, seed=0, weight_decay=0.01,
                               warmup_ratio=0.1)
    assert len(history) == 2 and clf.predict_proba(ROWS).shape == (len(ROWS), 3)
    assert clf.embed(ROWS).shape[0] == len(ROWS)

    sources = [source_text(task, r["label"]) for r in ROWS]
    for folder, seq2seq in ((tiny_causal_dir, False), (tiny_seq2seq_dir, True)):
        model, tok = load_generator(folder, cuda)
        model = attach_prompt(model, 4, "random", "", folder)
        assert model.get_prompt(1).device.type == "cuda"
        assert nll(model, tok, sources, [target_text(task, r) for r in ROWS], 64, 4, seq2seq) > 0
        runs = [sample_full(model, tok, sources, max_new_tokens=6, temperature=1.0, top_p=0.9, batch_size=4, seed=1)
                for _ in range(2)]
        assert len(runs[0].texts) == len(ROWS) and runs[0] == runs[1]  # seeded on the GPU too

    tok = tiny_tokenizer()
    cfg = ppo_config(lr=0.1, batch_size=6, mini_batch_size=3, ppo_epochs=1, max_new_tokens=4, top_p=0.9, seed=0)
    trainer = SoftPromptPPO(tiny_causal_peft(len(tok)).to(cuda), tok, cfg, good_fraction)
    stats = trainer.step(CONDITIONS * 2)
    assert trainer.value_head.weight.device.type == "cuda" and stats["response_length"] > 0


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_every_student_method_and_trl_on_cuda(in_tmp_repo, monkeypatch, tiny_encoder_dir):
    """The teacher, the index stage, every student method (cached teacher outputs, the retrieval
    student) and trl's GRPO, all on the GPU."""
    from retrikt.rl.trl_algos import TrlConfig, train_with_trl

    from .test_rl_ppo import CONDITIONS, good_fraction, rl_params, tiny_causal_peft, tiny_tokenizer
    from .test_train_student import make_tiny_repo, run_student

    monkeypatch.setenv("RETRIKT_MLFLOW", "0")
    cuda = device.resolve_device("cuda")
    params = make_tiny_repo(tiny_encoder_dir, epochs=2, retrieval_ce_weight=0.5)  # + the CE path
    for method in ("finetune", "vanilla_kd", "mgskd", "adkd", "retrikt_kd", "retrikt"):
        assert 0 <= run_student(params, method)["accuracy"] <= 1
    tok = tiny_tokenizer()
    model = tiny_causal_peft(len(tok)).to(cuda)
    logs = train_with_trl("grpo", model, tok, CONDITIONS, good_fraction,
                          TrlConfig(rl_params(updates=2, batch_size=8, max_new_tokens=4), 0,
                                    output_dir=str(in_tmp_repo / "trl")))
    assert len(logs) == 2 and model.prompt_encoder["default"].embedding.weight.device.type == "cuda"


# ------------------------------------------------------------------------------ dtype: auto
def test_auto_dtype_is_bf16_only_where_the_device_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "bf16_native", lambda d: True)
    assert device.resolve_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(device, "bf16_native", lambda d: False)
    assert device.resolve_dtype("auto", cpu) == "float32"
    for explicit in ("float32", "bfloat16"):  # an explicit value is kept, native or not
        assert device.resolve_dtype(explicit, cpu) == explicit


def test_bf16_native_follows_onednn_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert device.bf16_native(torch.device("cpu")) is False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert device.bf16_native(torch.device("cpu")) is True
    assert device.bf16_native(torch.device("meta")) is False
    assert device.execution_info(torch.device("cpu"))["bf16_native"] == "true"


@pytest.mark.parametrize("section", ["teacher", "prompt_tune", "rl", "generate", "student"])
def test_every_dtype_key_accepts_auto(section):
    raw = copy.deepcopy(RAW)
    raw[section]["dtype"] = "auto"
    assert getattr(parse_params(raw), section).dtype == "auto"


def test_the_student_stage_trains_in_the_resolved_dtype(monkeypatch):
    from retrikt.distill import train as train_stage

    seen = {}
    monkeypatch.setattr(train_stage, "resolve_dtype", lambda name, dev: f"resolved-{name}")

    def stop(*args, dtype, **kwargs):
        seen["dtype"] = dtype
        raise RuntimeError("stop")

    monkeypatch.setattr(train_stage, "fit", stop)
    monkeypatch.setattr(train_stage, "read_jsonl", lambda path: ROWS)
    monkeypatch.setattr(train_stage.Classifier, "from_base", lambda *a, **k: None)
    monkeypatch.setattr(train_stage.objectives, "finetune", lambda *a: type("O", (), {"extra": None})())
    raw = copy.deepcopy(RAW)
    raw["student"]["dtype"] = "auto"
    with pytest.raises(RuntimeError, match="stop"):
        train_stage.train_student(parse_params(raw), "cb", None, method="finetune", layers=2, seed=0)
    assert seen["dtype"] == "resolved-auto"
