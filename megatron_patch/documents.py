"""Reading a corpus of documents: jsonl (the text under one or more keys) or plain text with one
document per line, streamed in batches of lines; a bad line stops the read with its line number,
or is skipped and counted. Shared by tools/preprocess_data.py (whose workers parse the batches),
tools/train_tokenizer.py and tools/evaluate.py, with the input-data flags of the first two.
"""

import argparse
import json
import os
from typing import Dict, Iterator, List, Optional, Tuple


class DataError(ValueError):
    """A problem with the user's input or output paths; reported as one line."""


class BadLine(ValueError):
    """One input line that cannot be used; skippable with --skip-bad-lines."""


_JSON = json.JSONDecoder()


def input_format(path: str, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "text" if path.endswith(".txt") else "jsonl"


def check_input(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"input file {path} not found; pass the right --input "
                        "(tools/prepare_corpus.py makes one)")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise DataError(f"input {path} is not a readable file; pass a jsonl or .txt file")


BATCH_BYTES = 1 << 20  # a batch also ends after 1 MiB of input, so long documents stay cheap


def read_batches(path: str, batch_size: int) -> Iterator[Tuple[int, List[bytes]]]:
    """Yield (number of the first line, raw lines) in batches, streaming the file."""
    with open(path, "rb") as f:
        first, batch, size = 1, [], 0
        for lineno, raw in enumerate(f, 1):
            if not batch:
                first = lineno
            batch.append(raw)
            size += len(raw)
            if len(batch) == batch_size or size >= BATCH_BYTES:
                yield first, batch
                batch, size = [], 0
        if batch:
            yield first, batch


def parse_line(raw: bytes, lineno: int, keys: List[str], fmt: str) -> Optional[List[str]]:
    """The texts of one line, one per key; None if any is empty. Raises BadLine."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"line {lineno} is not UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                      f"{exc.start + 1}); re-encode the file as UTF-8") from None
    if fmt == "text":
        line = line.rstrip("\n").rstrip("\r")
        return None if not line or line.isspace() else [line]
    if line.isspace():
        return None
    try:
        record = _JSON.decode(line)
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at column {exc.colno}"
        raise BadLine(f"line {lineno} is not valid JSON ({reason})") from None
    if not isinstance(record, dict):
        raise BadLine(f"line {lineno} is not a JSON object")
    texts = []
    for key in keys:
        if key not in record:
            raise BadLine(f"line {lineno} has no key {key!r} (it has {sorted(record)[:5]}); "
                          "pass the right --json-keys")
        if not isinstance(record[key], str):
            raise BadLine(f"line {lineno}: {key!r} is {type(record[key]).__name__}, not a string")
        texts.append(record[key])
    return None if any(not t or t.isspace() for t in texts) else texts


def iter_documents(path: str, keys: List[str], fmt: str = "auto",
                   skip_bad_lines: bool = False, counts: Optional[Dict[str, int]] = None
                   ) -> Iterator[List[str]]:
    """Yield the texts (one per key) of each usable line, in order; used by train_tokenizer."""
    check_input(path)
    fmt = input_format(path, fmt)
    counts = counts if counts is not None else {}
    for first, lines in read_batches(path, 1024):
        for lineno, raw in enumerate(lines, first):
            try:
                texts = parse_line(raw, lineno, keys, fmt)
            except BadLine as exc:
                if not skip_bad_lines:
                    raise DataError(f"{path}: {exc} (or pass --skip-bad-lines)") from None
                counts["bad"] = counts.get("bad", 0) + 1
                continue
            if texts is None:
                counts["empty"] = counts.get("empty", 0) + 1
                continue
            yield texts


def add_input_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The input-data flags: --input, --json-keys, --input-format, --skip-bad-lines."""
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="jsonl, or .txt with one document per line")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys whose text is read from each JSON line (default: text)")
    group.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                       help="auto: .txt is plain text, anything else jsonl")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip (and count) lines that are not valid JSON/UTF-8 or lack a key")
    return parser
