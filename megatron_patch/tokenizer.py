"""Tokenizers shared by the data tools and the trainer (Megatron-LM's names and attributes).

`build_tokenizer(tokenizer_type, tokenizer_model=None, vocab_file=None, merge_file=None)` returns
an object with `tokenize(text) -> list[int]`, `detokenize(ids) -> str`, `vocab_size`, `eod` (the
end-of-document id appended by `preprocess_data.py --append-eod`) and `pad` (an id, or None).

- `SentencePieceTokenizer`: a sentencepiece `.model`. `eod` is the model's EOS id (2 for models
  made by tools/train_tokenizer.py, which uses unk=0, bos=1, eos=2, pad=3).
- `GPT2BPETokenizer`: GPT-2's byte-level BPE from `vocab.json` (token -> id, GPT-2's
  `encoder.json`) and `merges.txt` (GPT-2's `vocab.bpe`). `eod` is `<|endoftext|>`; `pad` is None.

Problems with the files raise `TokenizerError` (a ValueError) whose message names the file and
the fix. Importing this module is cheap: no torch, no megatron.
"""
import json
import os
import re
import sys
import unicodedata
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or inconsistent."""


def _check_file(path: Optional[str], what: str, flag: str) -> str:
    if not path:
        raise TokenizerError(f"no {what} given; pass {flag}")
    if not os.path.isfile(path):
        raise TokenizerError(f"{what} {path} not found; pass the right {flag}")
    if not os.access(path, os.R_OK):
        raise TokenizerError(f"{what} {path} is not readable; fix its permissions")
    return path


class SentencePieceTokenizer:
    """A sentencepiece model; ids are the model's piece ids."""

    def __init__(self, model_file: str):
        import sentencepiece

        _check_file(model_file, "tokenizer model", "--tokenizer-model")
        self.model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{model_file} is not a sentencepiece model ({exc}); train one "
                                 "with tools/train_tokenizer.py") from None
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{model_file} has no EOS piece to use as end-of-document; "
                                 "retrain it with tools/train_tokenizer.py")
        self.vocab_size = self._sp.GetPieceSize()
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def tokenize(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


def _byte_alphabet() -> List[str]:
    """GPT-2's reversible byte -> character table.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes
    (controls, space, soft hyphen, ...) take the characters 256, 257, ... in byte order, so every
    token is a string of printable characters.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, spare = [], 256
    for byte in range(256):
        if byte in printable:
            table.append(chr(byte))
        else:
            table.append(chr(spare))
            spare += 1
    return table


def _char_class(codepoints: List[int]) -> str:
    """A regex character-class body for the given sorted code points, as ranges."""
    parts, start = [], None
    for i, cp in enumerate(codepoints):
        if start is None:
            start = cp
        if i + 1 == len(codepoints) or codepoints[i + 1] != cp + 1:
            parts.append(re.escape(chr(start)) if start == cp
                         else f"{re.escape(chr(start))}-{re.escape(chr(cp))}")
            start = None
    return "".join(parts)


@lru_cache(maxsize=1)
def _gpt2_pretokenizer() -> "re.Pattern":
    r"""GPT-2's split pattern, written for the standard `re` module.

    GPT-2 uses  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    `re` has no \p{..}: letters are \w without digits, '_' and the non-decimal numbers (Nl, No);
    numbers are \d plus Nl/No; whitespace is Unicode White_Space, i.e. \s without \x1c-\x1f.
    """
    other_numbers = _char_class([cp for cp in range(sys.maxunicode + 1)
                                 if unicodedata.category(chr(cp)) in ("Nl", "No")])
    letter = rf"[^\W\d_{other_numbers}]"
    number = rf"[\d{other_numbers}]"
    space = r"[^\S\x1c-\x1f]"
    not_space = r"[\S\x1c-\x1f]"
    other = rf"(?:[^\s\w{other_numbers}]|[_\x1c-\x1f])"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letter}+| ?{number}+| ?{other}+"
                      rf"|{space}+(?!{not_space})|{space}+")


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE: split text into words, bytes to characters, merge pairs by rank."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        self.encoder = self._read_vocab(_check_file(vocab_file, "vocab file", "--vocab-file"))
        self.ranks = self._read_merges(_check_file(merge_file, "merge file", "--merge-file"))
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_to_char = _byte_alphabet()
        self.char_to_byte = {c: b for b, c in enumerate(self.byte_to_char)}
        self._check_consistent(vocab_file, merge_file)
        self.vocab_size = len(self.encoder)
        self.eod = self.encoder[self.EOD_TOKEN]
        self.pad = None
        self._pattern = _gpt2_pretokenizer()
        self._cache: Dict[str, List[int]] = {}

    @staticmethod
    def _read_vocab(path: str) -> Dict[str, int]:
        try:
            with open(path, encoding="utf-8") as f:
                vocab = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"vocab file {path} is not a JSON object of token -> id ({exc}); "
                                 "pass GPT-2's vocab.json (encoder.json) as --vocab-file") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerError(f"vocab file {path} is not a JSON object of token -> id; "
                                 "pass GPT-2's vocab.json (encoder.json) as --vocab-file")
        if len(set(vocab.values())) != len(vocab):
            raise TokenizerError(f"vocab file {path} gives one id to several tokens")
        return vocab

    @staticmethod
    def _read_merges(path: str) -> Dict[Tuple[str, str], int]:
        ranks = {}
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if (lineno == 1 and line.startswith("#version")) or not line.strip():
                        continue
                    pair = line.split()
                    if len(pair) != 2:
                        raise TokenizerError(f"merge file {path} line {lineno} is not two tokens; "
                                             "pass GPT-2's merges.txt (vocab.bpe) as --merge-file")
                    ranks.setdefault((pair[0], pair[1]), len(ranks))
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"merge file {path} is not UTF-8 text ({exc})") from None
        return ranks

    def _check_consistent(self, vocab_file: str, merge_file: str) -> None:
        """Every byte and every merge result must have an id, else encoding would fail later."""
        fix = "pass the vocab and merge files of the same tokenizer"
        if self.EOD_TOKEN not in self.encoder:
            raise TokenizerError(f"vocab file {vocab_file} has no {self.EOD_TOKEN} token; {fix}")
        for char in self.byte_to_char:
            if char not in self.encoder:
                raise TokenizerError(f"vocab file {vocab_file} lacks the byte token {char!r}; "
                                     f"{fix}")
        for first, second in self.ranks:
            if first + second not in self.encoder:
                raise TokenizerError(f"merge {first} {second} of {merge_file} makes a token that "
                                     f"vocab file {vocab_file} lacks; {fix}")

    def _merge(self, word: str) -> List[int]:
        """Apply the merges to one word (a string of byte characters), lowest rank first."""
        parts = list(word)
        while len(parts) > 1:
            never = len(self.ranks)
            best = min(zip(parts, parts[1:]), key=lambda pair: self.ranks.get(pair, never))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.encoder[part] for part in parts]

    def tokenize(self, text: str) -> List[int]:
        ids = []
        for word in self._pattern.findall(text):
            cached = self._cache.get(word)
            if cached is None:
                chars = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
                cached = self._merge(chars)
                if len(self._cache) < 200_000:
                    self._cache[word] = cached
            ids.extend(cached)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        try:
            chars = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as exc:
            raise TokenizerError(f"token id {exc.args[0]} is not in the vocabulary "
                                 f"(size {self.vocab_size})") from None
        data = bytearray()
        for char in chars:
            byte = self.char_to_byte.get(char)
            data.extend(char.encode("utf-8") if byte is None else (byte,))
        return data.decode("utf-8", errors="replace")


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None):
    """Build a tokenizer by Megatron-LM's type name; raises TokenizerError on bad files."""
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; choose one of "
                         f"{', '.join(TOKENIZER_TYPES)}")
