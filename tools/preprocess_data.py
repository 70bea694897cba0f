#!/usr/bin/env python
"""Tokenize a jsonl (or plain-text) corpus into Megatron's indexed dataset (.bin/.idx).

Flags and output names follow Megatron-LM's tools/preprocess_data.py: each --json-keys KEY gives
`{output_prefix}_{KEY}_document.bin/.idx`, written with megatron-core's IndexedDatasetBuilder
(token dtype uint16 below 65,500 ids, else int32), one document per input line.

Input: jsonl (one JSON object per line, the text under --json-keys), or plain text with one
document per line (`.txt`, or --input-format text; the output is named after the first key).
Lines whose text is empty or whitespace-only are skipped and counted. A bad line (invalid JSON,
not UTF-8, a missing or non-string key) stops the run with its line number, or is skipped and
counted with --skip-bad-lines. Every user error is one `error: ...` line on stderr and exit
status 1; outputs go to temporary names and are renamed only when complete, so no partial
.bin/.idx is ever left behind.

Workers: batches of lines (--chunk-size, at most 1 MiB) are tokenized by a multiprocessing pool
and written in input order, so any --workers gives byte-identical files; at most 4 batches per
worker are in flight, so memory does not grow with the corpus (the index keeps one length per
document, as in Megatron-LM).
"""
import argparse
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, List, Tuple

import numpy as np

from megatron_patch import interrupts

if __name__ == "__main__":  # Ctrl-C while the tokenizers import: one line
    interrupts.during_startup("preprocess_data.py")
from megatron_patch import data_identity  # noqa: E402
from megatron_patch.documents import BadLine, DataError, check_input, input_format, parse_line  # noqa: E402
from megatron_patch.documents import add_input_args, read_batches  # noqa: E402
from megatron_patch.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer  # noqa: E402
from megatron_patch.training.child_processes import process_alive  # noqa: E402


# ---------------------------------------------------------------------------- tokenizing

@dataclass
class EncodedBatch:
    """The tokens of one batch of lines: per key, the documents' ids concatenated."""
    tokens: List[np.ndarray]
    lengths: List[List[int]]
    input_bytes: int = 0
    empty: int = 0
    bad: List[Tuple[int, str]] = field(default_factory=list)


_WORKER: dict = {}


def init_worker(config: dict) -> None:
    """Build the tokenizer once per process (in-process for one worker)."""
    _WORKER.clear()
    _WORKER.update(config)
    _WORKER["tokenizer"] = build_tokenizer(**config["tokenizer"])


def init_pool_worker(config: dict) -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it stops the pool and cleans up)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(config)


def encode_batch(job: Tuple[int, List[bytes]]) -> EncodedBatch:
    first, lines = job
    tokenize, keys, fmt = _WORKER["tokenizer"].tokenize, _WORKER["keys"], _WORKER["format"]
    eod = [_WORKER["tokenizer"].eod] if _WORKER["append_eod"] else []
    ids: List[List[int]] = [[] for _ in keys]
    lengths: List[List[int]] = [[] for _ in keys]
    result = EncodedBatch(tokens=[], lengths=[], input_bytes=sum(map(len, lines)))
    for lineno, raw in enumerate(lines, first):
        try:
            texts = parse_line(raw, lineno, keys, fmt)
            if texts is None:
                result.empty += 1
                continue
            try:
                docs = [tokenize(text) for text in texts]
            except (UnicodeError, RuntimeError, ValueError) as exc:
                raise BadLine(f"line {lineno} cannot be tokenized ({exc})") from None
        except BadLine as exc:
            result.bad.append((lineno, str(exc)))
            continue
        for k, doc in enumerate(docs):
            ids[k] += doc
            ids[k] += eod
            lengths[k].append(len(doc) + len(eod))
    dtype = _WORKER["dtype"]
    result.tokens = [np.array(x, dtype=dtype) for x in ids]
    result.lengths = lengths
    return result


class Throttle:
    """Caps the batches in flight: the pool's feeder thread waits for the writer to catch up."""

    def __init__(self, slots: int):
        self._slots = threading.Semaphore(slots)
        self._stopped = False

    def feed(self, jobs: Iterator) -> Iterator:
        for job in jobs:
            self._slots.acquire()
            if self._stopped:
                return
            yield job

    def done_one(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        """Let a waiting feeder exit (else Pool.terminate() would wait for it forever)."""
        self._stopped = True
        self._slots.release()


def encoded_batches(args, config: dict) -> Iterator[EncodedBatch]:
    """Tokenized batches in input order, in-process for one worker, else from a pool."""
    jobs = read_batches(args.input, args.chunk_size)
    if args.workers == 1:
        init_worker(config)
        yield from map(encode_batch, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    throttle = Throttle(4 * args.workers)
    gc.freeze()  # the parent's objects stay out of the workers' GC: fewer copy-on-write pages
    try:
        pool = context.Pool(args.workers, initializer=init_pool_worker, initargs=(config,))
    finally:
        gc.unfreeze()
    with pool:
        try:
            for batch in pool.imap(encode_batch, throttle.feed(jobs)):
                throttle.done_one()
                yield batch
        finally:
            throttle.stop()


# ---------------------------------------------------------------------------- writing output

class Progress:
    """A progress line on stderr: rewritten in place on a terminal, every 10 s otherwise."""

    def __init__(self):
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.docs = self.bytes = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.docs} documents, {self.bytes / 1e6:.1f} MB in {elapsed:.1f} s "
                f"({self.docs / elapsed:.0f} docs/s, {self.bytes / 1e6 / elapsed:.2f} MB/s)")

    def update(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty and self.last != self.start:
            print(file=sys.stderr)


def output_prefixes(args) -> List[str]:
    keys = args.json_keys[:1] if args.format == "text" else args.json_keys
    return [f"{args.output_prefix}_{key}_document" for key in keys]


def check_output_dir(prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        raise DataError(f"output directory {directory} does not exist; create it or change "
                        "--output-prefix")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DataError(f"output directory {directory} is not writable; change --output-prefix")


@lru_cache(maxsize=1)
def batch_builder_class():
    """megatron-core's IndexedDatasetBuilder plus add_documents(), which writes a whole batch.

    add_documents(tokens, lengths) gives the same .bin/.idx as add_document() called once per
    document (a test checks this) with one write instead of thousands of small ones.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns about missing apex/TE on import
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    class BatchBuilder(IndexedDatasetBuilder):
        def add_documents(self, tokens: np.ndarray, lengths: List[int]) -> None:
            self.data_file.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
            start = len(self.sequence_lengths)
            self.sequence_lengths.extend(lengths)
            self.document_indices.extend(range(start + 1, start + 1 + len(lengths)))

    return BatchBuilder


def remove_stale_temporaries(prefix: str) -> None:
    """Remove <prefix>.bin/.idx.tmpPID files of a run that is gone (killed with -9, say): a
    temporary whose pid is alive belongs to a run still writing, and is left alone."""
    import glob

    for path in glob.glob(glob.escape(prefix) + ".bin.tmp*") + glob.glob(glob.escape(prefix) + ".idx.tmp*"):
        pid = path.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            os.remove(path)


def preprocess(args) -> dict:
    """Tokenize args.input into the .bin/.idx pairs; returns counts. Raises DataError."""
    check_input(args.input)
    args.format = input_format(args.input, args.input_format)
    prefixes = output_prefixes(args)
    check_output_dir(args.output_prefix)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                args.merge_file)
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32  # DType.optimal_dtype
    config = dict(tokenizer=dict(tokenizer_type=args.tokenizer_type,
                                 tokenizer_model=args.tokenizer_model,
                                 vocab_file=args.vocab_file, merge_file=args.merge_file),
                  keys=args.json_keys[:len(prefixes)], format=args.format,
                  append_eod=args.append_eod, dtype=dtype)
    builder_class = batch_builder_class()  # imports megatron-core: a few seconds
    tag = f".tmp{os.getpid()}"
    for prefix in prefixes:
        remove_stale_temporaries(prefix)
    temps = [p + suffix + tag for p in prefixes for suffix in (".bin", ".idx")]
    counts = dict(documents=0, tokens=0, empty=0, bad=0, first_bad="")
    progress = Progress()
    batches = encoded_batches(args, config)
    builders = []
    try:
        for prefix in prefixes:
            builders.append(builder_class(prefix + ".bin" + tag, dtype=dtype))
        for batch in batches:
            if batch.bad:
                if not args.skip_bad_lines:
                    raise DataError(f"{args.input}: {batch.bad[0][1]} (or pass --skip-bad-lines)")
                counts["first_bad"] = counts["first_bad"] or batch.bad[0][1]
                counts["bad"] += len(batch.bad)
            counts["empty"] += batch.empty
            for builder, tokens, lengths in zip(builders, batch.tokens, batch.lengths):
                builder.add_documents(tokens, lengths)
            counts["documents"] += len(batch.lengths[0])
            counts["tokens"] += int(batch.tokens[0].size)
            progress.update(len(batch.lengths[0]), batch.input_bytes)
        progress.finish()
        counts["summary"] = progress.line()
        if counts["documents"] == 0:
            raise DataError(f"{args.input} has no usable documents ({counts['empty']} empty, "
                            f"{counts['bad']} bad lines); nothing written")
        for prefix, builder in zip(prefixes, builders):
            builder.finalize(prefix + ".idx" + tag)
        identity = data_identity.tokenizer_identity(
            args.tokenizer_type, tokenizer.vocab_size, tokenizer_model=args.tokenizer_model,
            vocab_file=args.vocab_file, merge_file=args.merge_file)
        for prefix in prefixes:  # the .idx last: a prefix "exists" only once both are there
            data_identity.remove_records(prefix)  # an old dataset's, never left beside the new one
            if os.path.exists(prefix + ".idx"):
                os.remove(prefix + ".idx")
            os.replace(prefix + ".bin" + tag, prefix + ".bin")
            os.replace(prefix + ".idx" + tag, prefix + ".idx")
            data_identity.write_tokenizer_identity(prefix, identity)  # what the trainer checks
    except OSError as exc:
        raise DataError(f"I/O error on {exc.filename or args.output_prefix} "
                        f"({exc.strerror or exc}); check the path, free disk space and "
                        "--output-prefix") from None
    finally:
        batches.close()
        for builder in builders:
            builder.data_file.close()  # no public close(); finalize() closes it too
        for path in temps:
            if os.path.isfile(path):
                os.remove(path)
    return counts


# ---------------------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize jsonl/txt into Megatron .bin/.idx "
                    "(PREFIX_<key>_document.bin/.idx).",
        epilog="Empty or whitespace-only documents are skipped and counted. Errors are one line "
               "on stderr (exit status 1) and leave no .bin/.idx behind.")
    add_input_args(parser)
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", help="sentencepiece .model (SentencePieceTokenizer)")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="path prefix; writes PREFIX_<key>_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    group.add_argument("--chunk-size", type=int, default=256,
                       help="lines per task sent to a worker (at most 1 MiB; default: 256)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1:
        parser.error("--workers and --chunk-size must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        counts = preprocess(args)
    except (DataError, TokenizerError) as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing written")
    skipped = f"; skipped {counts['empty']} empty documents"
    if counts["bad"]:
        skipped += f" and {counts['bad']} bad lines (first: {counts['first_bad']})"
    names = ", ".join(p + ".bin/.idx" for p in output_prefixes(args))
    print(f"done: {counts['summary']}, {counts['tokens']} tokens{skipped}; wrote {names}",
          file=sys.stderr)


if __name__ == "__main__":
    sys.exit(interrupts.run_main("preprocess_data.py", main))
