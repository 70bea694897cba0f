"""megatron_patch.evaluation.heldout: the documents a run held out, as text, and LAMBADA-style passages.

The held-out documents must be exactly those megatron-core's GPTDataset gives the validation split
(built here with the trainer's own dataset code), and their text the input documents.
"""

import json
from types import SimpleNamespace

import pytest

from megatron_patch.evaluation import heldout
from tests.unit.test_data_pipeline import make_documents, preprocess, train_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heldout")
    docs = make_documents(61, seed=3)
    write_jsonl(tmp / "docs.jsonl", docs)
    train_tokenizer.main(["--input", str(tmp / "docs.jsonl"), "--vocab-size", "400", "--output-prefix",
                          str(tmp / "tok"), "--threads", "1"])
    prefix = preprocess(tmp, tmp / "docs.jsonl", tmp / "tok.model", "--append-eod", prefix="corpus")
    return SimpleNamespace(tmp=tmp, docs=docs, prefix=prefix, model=tmp / "tok.model")


def gpt_dataset_documents(corpus, split):
    """Document indices of the validation GPTDataset the trainer builds for --split."""
    from megatron_patch.training.arguments import parse_and_validate
    from megatron_patch.training.data import build_datasets, build_tokenizer
    from tests.train_helpers import tiny_args

    argv = tiny_args("--train-iters", 4, "--eval-interval", 4, "--eval-iters", 1, "--tokenizer-type",
                     "SentencePieceTokenizer", "--tokenizer-model", corpus.model, data=corpus.prefix)
    argv[argv.index("--split") + 1] = split
    args = parse_and_validate(argv, world_size=1)
    _, valid, _ = build_datasets(args, build_tokenizer(args))
    return sorted(set(int(i) for i in valid.document_index))  # every epoch's shuffle of the split's documents


@pytest.mark.parametrize("split", ["80,20,0", "98,2,0", "70,15,15"])
def test_heldout_documents_are_the_validation_split(corpus, split, tmp_path):
    out = tmp_path / split.replace(",", "_")
    out.mkdir()
    assert heldout.main(["--data-path", corpus.prefix, "--split", split, "--tokenizer-model", str(corpus.model),
                         "--output-dir", str(out)]) == 0
    texts = [json.loads(line)["text"] for line in (out / "heldout.jsonl").read_text().splitlines()]
    indices = gpt_dataset_documents(corpus, split)
    assert indices and texts == [corpus.docs[i] for i in indices]
    for line in (out / "lambada.jsonl").read_text().splitlines():
        passage = json.loads(line)["text"]
        words = passage.split(" ")
        assert len(words) >= 15 and words[-1].isalpha() and all(words)  # single spaces
        assert any(" ".join(doc.split()).startswith(passage + ".") for doc in texts)


def test_passages():
    words = " ".join(f"w{i}" for i in range(14))
    assert heldout.lambada_passage(f"{words} ends here. More text.") == f"{words} ends here"
    passage = heldout.lambada_passage(f"{words} 1999. Then  the   river flows on.")
    assert passage == f"{words} 1999. Then the river flows on"
    assert heldout.lambada_passage("too short.") is None


def test_bad_input_is_one_line(corpus, tmp_path, capsys):
    cases = [(["--data-path", str(tmp_path / "none")], "none.bin not found"),
             (["--data-path", corpus.prefix, "--output-dir", str(tmp_path / "missing")], "no such directory"),
             (["--data-path", corpus.prefix, "--split", "100,0,0"], "holds out no valid document")]
    for argv, named in cases:
        base = {"--split": "98,2,0", "--tokenizer-model": str(corpus.model), "--output-dir": str(tmp_path)}
        for flag in argv[::2]:
            base.pop(flag, None)
        full = argv + [x for kv in base.items() for x in kv]
        assert heldout.main(full) == 1
        err = capsys.readouterr().err
        assert err.startswith("heldout: error: ") and err.count("\n") == 1 and named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
