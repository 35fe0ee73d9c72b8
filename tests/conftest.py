"""Shared fixtures: tiny models built in the test session (tiny configs, tokenizers trained on the fly).

Nothing here touches the network: HF is forced offline and MLflow writes to a temporary sqlite store.
The `slow` tests use the real registry models (SmolLM2-135M, all-MiniLM-L6-v2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_MLFLOW_DIR = tempfile.mkdtemp(prefix="retrikt-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_DIR}/mlflow.db"
from retrikt.tracking import disable_telemetry  # noqa: E402

disable_telemetry()

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("RETRIKT_DATA_DIR") or REPO.parent / "shared" / "data" / "glue")
FIXTURES = Path(__file__).parent / "fixtures"

def tiny_models(params: dict, encoder: Path | None = None, generator: Path | None = None) -> dict:
    """``params`` (params.yaml's dict) with the tiny local models in place of the registry ones, and the
    teacher pinned to the encoder: params.yaml's teacher (all-mpnet-base-v2, a 420 MB registry zip) is
    dropped, so a test project resolves and trains tiny models only."""
    models = params["models"]
    for role, path, name in (("encoder", encoder, "tiny-bert"), ("generator", generator, "tiny-llama")):
        if path is not None:
            models[role] = {"name": name, "source": "local", "path": str(path)}
    for key in [k for k in models if k not in ("encoder", "generator")]:
        del models[key]
    params["teacher"]["model"] = "encoder"
    return params


CORPUS = [
    "premise: the cat sat on the mat . hypothesis: a cat is sitting .",
    "premise: it rained all day . hypothesis: the ground is dry .",
    "question: cause effect choice1: choice2: text: sentence1: sentence2: passage: word:",
    "Task: natural language inference . Label: entailment contradiction neutral .",
    "Write a new example for the task described below . what was the cause ? happened as a result",
    "the quick brown fox jumps over the lazy dog , and the dog sleeps .",
    "yes no true false positive negative good bad great terrible movie film",
]


def _word_tokenizer(kind: str):
    """A tiny tokenizer trained on CORPUS: WordPiece (BERT-like) or BPE (decoder-like)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = CORPUS * 3 + [chr(c) for c in range(32, 127)]
    if kind == "wordpiece":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        # the vocabulary is built, not trained: the trainer breaks frequency ties in hash order, which
        # changes the tiny encoders (and the tests' numbers) from one process to the next
        norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        words = sorted({w for line in corpus for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))})
        chars = sorted({c for w in words for c in w})
        vocab = list(dict.fromkeys(special + chars + ["##" + c for c in chars] + words))
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = norm, pre
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_tiny_encoder(path: Path, layers: int = 4) -> Path:
    """A BERT-like encoder folder (BertModel + WordPiece tokenizer), H=32."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = _word_tokenizer("wordpiece")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, type_vocab_size=2)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def char_tokenizer():
    """A WordPiece tokenizer that knows only characters (every word split into letters) and frames a
    pair RoBERTa-style, ``<s> A </s> </s> B </s>``: a teacher that tokenizes unlike the tiny encoders."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    chars = sorted({c for line in CORPUS for c in line.lower() if not c.isspace()})
    vocab = list(dict.fromkeys(special + chars + ["##" + c for c in chars]))
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B:1 </s>:1", special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def make_tiny_mpnet(path: Path, layers: int = 2, chars: bool = False) -> Path:
    """An MPNet encoder folder (a RoBERTa-style classifier head reads token 0), H=32; the tiny encoders'
    WordPiece tokenizer, or :func:`char_tokenizer` (``chars``)."""
    import torch
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    tok = char_tokenizer() if chars else _word_tokenizer("wordpiece")
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    MPNetModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_causal(path: Path) -> Path:
    """A Llama-like causal LM folder + BPE tokenizer, H=32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _word_tokenizer("bpe")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_seq2seq(path: Path) -> Path:
    """A T5-like encoder-decoder folder + BPE tokenizer, d_model=32."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = _word_tokenizer("bpe")
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def fit_tiny_generator(base: Path, task, rows: list[dict], out: Path, max_length: int, steps: int) -> Path:
    """A copy of a tiny causal LM fitted (all weights, seconds) to write ``rows`` of ``task`` after
    each row's label condition, so its samples parse; saved to ``out``."""
    import torch

    from retrikt.llm import source_text, target_text, token_nll, tokenize_for_training
    from retrikt.models import load_generator

    torch.manual_seed(0)
    model, tok = load_generator(base)
    model.requires_grad_(True)
    batch = tokenize_for_training(tok, [source_text(task, r["label"]) for r in rows],
                                  [target_text(task, r) for r in rows], max_length, seq2seq=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, n = token_nll(model, batch, seq2seq=False)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def tiny_mpnet_dir(tmp_path_factory) -> Path:
    return make_tiny_mpnet(tmp_path_factory.mktemp("tiny-mpnet"))


@pytest.fixture(scope="session")
def tiny_char_mpnet_dir(tmp_path_factory) -> Path:
    return make_tiny_mpnet(tmp_path_factory.mktemp("tiny-char-mpnet"), chars=True)


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory) -> Path:
    return make_tiny_causal(tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="session")
def tiny_seq2seq_dir(tmp_path_factory) -> Path:
    return make_tiny_seq2seq(tmp_path_factory.mktemp("tiny-seq2seq"))


@pytest.fixture(autouse=True)
def _isolate_torch_global_state():
    """seed_everything() switches torch to deterministic algorithms process-wide; keep each test's
    numerics independent of which tests ran before it."""
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(was)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box they thrash."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def in_tmp_repo(tmp_path, monkeypatch) -> Path:
    """Run a test inside an empty working directory (stages write relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """``real_model(role)``: the registry model folder the pipeline resolved, else resolved now from
    params.yaml's spec into a temporary folder (a fresh clone has no models/base/); skips if the
    registry package is not installed."""
    import yaml

    from retrikt.errors import ModelResolutionError
    from retrikt.params import ModelSpec
    from retrikt.resolve_model import resolve

    found: dict[str, Path] = {}

    def get(role: str) -> Path:
        if role not in found:
            done = REPO / "models" / "base" / role
            if (done / "config.json").exists():
                found[role] = done
            else:
                spec = ModelSpec(**yaml.safe_load((REPO / "params.yaml").read_text())["models"][role])
                try:
                    found[role] = resolve(spec, role, tmp_path_factory.mktemp("base"))
                except ModelResolutionError as e:
                    pytest.skip(f"{role} model not available: {e}")
        return found[role]

    return get


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "cb" / "train.jsonl").exists():
        pytest.skip(f"GLUE mirror not found at {MIRROR}")
    return MIRROR
