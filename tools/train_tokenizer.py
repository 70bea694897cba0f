#!/usr/bin/env python
"""Train a sentencepiece tokenizer on a jsonl (or one-document-per-line .txt) corpus.

Writes PREFIX.model and PREFIX.vocab (piece<TAB>score per id). Special ids: unk=0, bos=1,
eos=2, pad=3; the EOS id (2) is the end-of-document id (`eod`) that
`tools/preprocess_data.py --append-eod` appends. The model is lossless: no text normalisation
(identity rule), whitespace kept as is, and characters outside the vocabulary fall back to byte
pieces, so detokenize(tokenize(text)) == text. This needs --vocab-size above 260 (256 byte
pieces + 4 special).

Deterministic: the same input, options and --seed give a byte-identical .model (the output
path is not stored in it).

Usage: python tools/train_tokenizer.py --input data/wiki.jsonl --vocab-size 8000 \
           --model-type bpe --output-prefix data/wiki_bpe8k
"""
import argparse
import io
import os
import sys
import tempfile

from megatron_patch.documents import DataError, add_input_args, iter_documents

SPECIAL_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)
MAX_LINE_BYTES = 1 << 16  # longer lines are left out of training (sentencepiece's limit)


def training_lines(documents, counts: dict):
    """Each non-blank line of each document: sentencepiece trains on sentence-sized pieces.

    A DataError of the reader is kept in counts["error"] (and ends the input) rather than
    raised through sentencepiece's C++ code.
    """
    try:
        for texts in documents:
            for text in texts:
                for line in text.split("\n"):
                    if line.strip():
                        counts["lines"] = counts.get("lines", 0) + 1
                        yield line
    except DataError as exc:
        counts["error"] = exc


def write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def vocab_text(model: bytes) -> bytes:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    rows = (f"{sp.IdToPiece(i)}\t{sp.GetScore(i):g}\n" for i in range(sp.GetPieceSize()))
    return "".join(rows).encode("utf-8")


def train(args) -> dict:
    """Train and write PREFIX.model/.vocab; returns counts. Raises DataError."""
    import sentencepiece

    directory = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise DataError(f"output directory {directory} is missing or not writable; change "
                        "--output-prefix")
    if args.vocab_size <= 260:
        raise DataError(f"--vocab-size {args.vocab_size} is too small: 256 byte pieces and 4 "
                        "special ids need more than 260")
    counts = {}
    documents = iter_documents(args.input, args.json_keys, args.input_format,
                               args.skip_bad_lines, counts)
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(args.seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=training_lines(documents, counts), model_writer=model,
            vocab_size=args.vocab_size, model_type=args.model_type,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=True, max_sentence_length=MAX_LINE_BYTES,
            num_threads=args.threads, minloglevel=0 if args.verbose else 2, **SPECIAL_IDS)
    except RuntimeError as exc:
        if "error" in counts:
            raise counts["error"]
        if not counts.get("lines"):
            raise DataError(f"{args.input} has no text to train on") from None
        raise DataError(f"sentencepiece training failed: {str(exc).strip()} (give more text or "
                        "a smaller --vocab-size)") from None
    if "error" in counts:
        raise counts["error"]
    try:
        write_atomically(args.output_prefix + ".model", model.getvalue())
        write_atomically(args.output_prefix + ".vocab", vocab_text(model.getvalue()))
    except OSError as exc:
        raise DataError(f"cannot write {args.output_prefix}.model: {exc}") from None
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a sentencepiece tokenizer "
                                                 "(PREFIX.model, PREFIX.vocab; eod = eos id 2).")
    add_input_args(parser)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (default: 1234)")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="train on at most this many lines, sampled with --seed "
                             "(default: %(default)s; 0 = all)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="share of characters given their own piece; the rest use bytes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        counts = train(args)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    skipped = "".join(f", skipped {counts[k]} {k} lines" for k in ("empty", "bad") if counts.get(k))
    print(f"trained a {args.model_type} model ({args.vocab_size} pieces) on {counts['lines']} "
          f"lines{skipped}; wrote {args.output_prefix}.model and .vocab (eod = eos id 2)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
