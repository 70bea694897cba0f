"""SentencePiece -> transformers tokenizer (megatron_patch/export/sentencepiece_hf.py).

Tiny sentencepiece models are trained here (CI has no data/quickstart): BPE and unigram as
tools/train_tokenizer.py makes them (identity normalization, byte fallback), and one with
sentencepiece's defaults (nmt_nfkc charsmap, extra whitespace removed, no byte fallback, so unknown
characters). On every text the tokenizer that AutoTokenizer loads from the export gives the
trainer's ids (megatron_patch.tokenizer.SentencePieceTokenizer, i.e. EncodeAsIds), its eos id is
the trainer's EOD, and decoding gives sentencepiece's text back. With data/quickstart present
(the main job's corpus and tokenizer) 2,000 of its articles are checked too.
"""

import io
import json

import pytest

pytest.importorskip("transformers")

from megatron_patch.export.sentencepiece_hf import hf_tokenizer  # noqa: E402
from megatron_patch.export.tokenizer_files import PROBES  # noqa: E402
from megatron_patch.tokenizer import SentencePieceTokenizer  # noqa: E402
from tests.train_helpers import ROOT  # noqa: E402
from tests.unit.test_data_pipeline import SPECIAL, make_documents, train_tokenizer, write_jsonl  # noqa: E402

EDGE = ["", " ", "   ", "a", " a", "a ", "a  b", "  a   b  ", "\n", "x\n\ny", "\t tab", "ǅ ﬁ ① Ａ", "e\u0301",
        "\u00a0nbsp", "🙂🙂🙂", "ʘ ʘʘ", "<unk> <s> </s> <pad> <0x41>", "▁ literal", "mixed 東京 text ß"]


def texts():
    return make_documents(300, seed=5) + SPECIAL + PROBES + EDGE


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    # "<", "/", ">" known: see sentencepiece_hf.py on literal "</s>" in text under unigram
    corpus = write_jsonl(tmp / "docs.jsonl", make_documents(300) + ["see <b> and/or <i> at 0x41 <pad>"] * 30)
    out = {}
    for kind in ("bpe", "unigram"):
        train_tokenizer.main(["--input", str(corpus), "--vocab-size", "400", "--model-type", kind,
                              "--output-prefix", str(tmp / kind), "--threads", "1"])
        out[kind] = tmp / f"{kind}.model"
    import sentencepiece

    model = io.BytesIO()  # sentencepiece's defaults: nmt_nfkc, remove_extra_whitespaces, no byte fallback
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(make_documents(300)), model_writer=model,
                                             vocab_size=300, character_coverage=0.98, model_type="bpe",
                                             minloglevel=2, num_threads=1)
    (tmp / "nfkc.model").write_bytes(model.getvalue())
    out["nfkc"] = tmp / "nfkc.model"
    return out


def exported(model_file, tmp_path):
    from transformers import AutoTokenizer

    hf_tokenizer(str(model_file), 64).save_pretrained(str(tmp_path / "tok"))
    return AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)


def assert_same(trainer, hf, samples, lossless):
    for text in samples:
        ids = trainer.tokenize(text)
        assert hf(text)["input_ids"] == ids, text
        decoded = hf.decode(ids)
        assert decoded == trainer.detokenize(ids), text
        if lossless and "▁" not in text:  # sentencepiece itself decodes a literal "▁" as a space
            assert decoded == text


@pytest.mark.parametrize("kind", ["bpe", "unigram", "nfkc"])
def test_ids_eod_and_decoding_equal_the_trainers(models, kind, tmp_path):
    trainer = SentencePieceTokenizer(str(models[kind]))
    hf = exported(models[kind], tmp_path)
    assert hf.eos_token_id == trainer.eod and hf.eos_token == "</s>"
    assert len(hf) == trainer.vocab_size and hf.model_max_length == 64
    samples = texts()
    assert_same(trainer, hf, samples, lossless=kind != "nfkc")
    unknown = trainer.tokenize("ʘ")  # a character the corpus lacks
    if kind == "nfkc":  # the charsmap and the whitespace rules were exercised, and the unknown piece
        assert trainer.tokenize("Ａ  ﬁ") == trainer.tokenize("A fi") and unknown[-1] == 0
    else:  # byte fallback: <0xCA> <0x98>
        assert unknown[-2:] == [4 + 0xCA, 4 + 0x98]


def test_batch_padding_and_no_added_specials(models, tmp_path):
    """What pipelines and lm-eval call: batched encoding adds no BOS/EOS; padding uses <pad>."""
    trainer = SentencePieceTokenizer(str(models["bpe"]))
    hf = exported(models["bpe"], tmp_path)
    batch = hf(["school house", "a"], padding=True)
    assert batch["input_ids"][0] == trainer.tokenize("school house")
    assert batch["input_ids"][1][:len(trainer.tokenize("a"))] == trainer.tokenize("a")
    assert hf.pad_token_id == trainer.pad


@pytest.mark.skipif(not (ROOT / "data/quickstart/tok.model").is_file(), reason="no data/quickstart (main job)")
def test_quickstart_tokenizer_on_its_corpus(tmp_path):
    trainer = SentencePieceTokenizer(str(ROOT / "data/quickstart/tok.model"))
    hf = exported(ROOT / "data/quickstart/tok.model", tmp_path)
    with open(ROOT / "data/quickstart/wiki.jsonl", encoding="utf-8") as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    assert hf.eos_token_id == trainer.eod
    assert_same(trainer, hf, sample, lossless=True)


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_export_tokenizer_checks_the_files_it_writes(models, kind, tmp_path):
    """tokenizer_files.export_tokenizer writes the tokenizer and loads it back through
    AutoTokenizer before the export is kept; GPT-2 BPE (a tiny vocabulary) and SentencePiece."""
    from types import SimpleNamespace

    from megatron_patch.export.tokenizer_files import check_ids, export_tokenizer
    from megatron_patch.training.data import build_tokenizer
    from tests.unit.test_data_tokenizer import write_tiny_gpt2

    if kind == "gpt2":
        _, vocab_file, merge_file = write_tiny_gpt2(tmp_path)
        args = SimpleNamespace(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file,
                               tokenizer_model=None, vocab_size=None)
    else:
        args = SimpleNamespace(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(models["bpe"]),
                               vocab_file=None, merge_file=None, vocab_size=None)
    trainer = build_tokenizer(args)
    out = tmp_path / "out"
    out.mkdir()
    assert "ids as the trainer's" in export_tokenizer(args, str(out), trainer.eod, 64)
    if kind == "bpe":  # a class name transformers 4.x knows too
        assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    check_ids(trainer, str(out), trainer.eod, texts())  # every test text, not only the probes
    with pytest.raises(Exception, match="eos id"):
        check_ids(trainer, str(out), trainer.eod + 1)
