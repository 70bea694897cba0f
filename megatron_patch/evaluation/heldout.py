"""The documents a training run held out, as text: for tools/evaluate.py and lm-evaluation-harness.

  python -m megatron_patch.evaluation.heldout --data-path PREFIX --split 98,2,0 \
      --tokenizer-model tok.model --output-dir DIR [--part valid] [--max-lambada N]

writes DIR/heldout.jsonl (one {"text": ...} per held-out document) and DIR/lambada.jsonl
(LAMBADA-style passages made from them). The held-out documents are those megatron-core's
dataset builder gives the split: documents [round(lo * N), round(hi * N)) of the .bin/.idx, with
(lo, hi) from its own split matrix (parse_and_normalize_split, convert_split_vector_to_split_matrix).
Their text is the stored ids detokenized; a document whose text does not tokenize back to the
same ids (a lossy tokenizer) is left out and counted.

A passage is a document's opening sentences, ending at the first sentence end after at least
`min_words` words whose last word is letters only; the final period is dropped, and that word is
the target.
Words are joined by single spaces, so tools/evaluate.py (whitespace split) and
lm-evaluation-harness's lambada protocol (text.split(' ')) cut context and target alike.
"""

import argparse
import json
import os
import sys

PARTS = ("train", "valid", "test")


def heldout_range(num_documents: int, split: str, part: str = "valid"):
    """(first, end) document index of `part` under megatron-core's split of `split`."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    bookends = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[PARTS.index(part)]
    if bookends is None:
        return 0, 0
    # BlendedMegatronDatasetBuilder._build_megatron_dataset_splits rounds the same way
    return int(round(bookends[0] * num_documents)), int(round(bookends[1] * num_documents))


def heldout_texts(prefix: str, split: str, tokenizer, part: str = "valid"):
    """(texts, left_out) of the `part` documents of the .bin/.idx `prefix`."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    first, end = heldout_range(len(dataset), split, part)
    texts, left_out = [], 0
    for i in range(first, end):
        ids = [int(t) for t in dataset[i]]
        if ids and ids[-1] == tokenizer.eod:
            ids = ids[:-1]
        text = tokenizer.detokenize(ids)
        if not ids or tokenizer.tokenize(text) != ids:
            left_out += 1
            continue
        texts.append(text)
    return texts, left_out


def lambada_passage(text: str, min_words: int = 15, max_words: int = 120):
    """The opening sentences of `text` as a LAMBADA-style passage, or None (see the module doc)."""
    words = text.split()
    for k in range(min_words - 1, min(len(words), max_words)):
        if words[k].endswith(".") and not words[k].endswith(".."):
            last = words[k][:-1]
            if len(last) > 1 and last.isalpha():
                return " ".join(words[:k] + [last])
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="Prefix of the training run's .bin/.idx.")
    p.add_argument("--split", required=True, help="The training run's --split, e.g. 98,2,0.")
    p.add_argument("--part", choices=PARTS, default="valid")
    p.add_argument("--tokenizer-model", required=True, help="The run's sentencepiece model.")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-lambada", type=int, default=500, help="At most this many passages.")
    args = p.parse_args(argv)

    from megatron_patch.tokenizer import SentencePieceTokenizer, TokenizerError

    for ext in (".bin", ".idx"):
        if not os.path.isfile(args.data_path + ext):
            return _fail(f"--data-path: {args.data_path + ext} not found (give the prefix, as to pretrain_gpt.py)")
    if not os.path.isdir(args.output_dir):
        return _fail(f"--output-dir {args.output_dir}: no such directory; create it first")
    try:
        tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    except TokenizerError as exc:
        return _fail(str(exc))
    texts, left_out = heldout_texts(args.data_path, args.split, tokenizer, args.part)
    if not texts:
        return _fail(f"--split {args.split} holds out no {args.part} document of {args.data_path} "
                     f"({left_out} left out as not recoverable); give the run's --split")
    passages = [q for q in map(lambada_passage, texts) if q][:args.max_lambada]
    for name, rows in (("heldout.jsonl", texts), ("lambada.jsonl", passages)):
        tmp = os.path.join(args.output_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
        os.replace(tmp, os.path.join(args.output_dir, name))
    print(f"{len(texts)} held-out documents ({args.part} of --split {args.split}; {left_out} left out) -> "
          f"{args.output_dir}/heldout.jsonl; {len(passages)} LAMBADA-style passages -> {args.output_dir}/lambada.jsonl")
    return 0


def _fail(message: str) -> int:
    print(f"heldout: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
