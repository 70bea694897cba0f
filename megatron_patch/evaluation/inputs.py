"""What the scorers read: token ids from a .bin/.idx prefix or from documents, LAMBADA examples,
and the checkpoint's tokenizer. Problems raise SetupError (one line naming the fix)."""

from types import SimpleNamespace

import numpy as np

from megatron_patch.training.errors import SetupError

TOKENIZER_FLAGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")


def indexed_tokens(prefix: str) -> np.ndarray:
    """All documents of the .bin/.idx pair `prefix` (megatron-core's IndexedDataset), concatenated
    as stored: tools/preprocess_data.py --append-eod has already ended each with EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    if len(dataset) == 0:
        raise SetupError(f"--data-path {prefix}: the dataset has no documents; pass a non-empty one")
    return np.concatenate(dataset[0:len(dataset)]).astype(np.int64)


def document_tokens(documents, tokenizer) -> np.ndarray:
    """The documents tokenized, each followed by EOD: what preprocess_data.py --append-eod writes."""
    ids = []
    for doc in documents:
        ids += tokenizer.tokenize(doc)
        ids.append(tokenizer.eod)
    return np.array(ids, dtype=np.int64)


def check_ids(tokens: np.ndarray, vocab_size: int, source: str) -> None:
    """Refuse ids the model has no row for meaning (data made with another tokenizer)."""
    top = int(tokens.max())
    if top >= vocab_size:
        raise SetupError(f"{source} holds token id {top}, but the checkpoint's vocabulary has {vocab_size} "
                         "ids; use data made with the tokenizer the model was trained with")


def split_last_word(text: str):
    """(context, target): target = ' ' + the last whitespace-separated word, context = the text
    before it, stripped (Megatron-LM's tasks/zeroshot_gpt LAMBADA); None for fewer than 2 words."""
    words = text.split()
    if len(words) < 2:
        return None
    return text[:text.rstrip().rfind(words[-1])].strip(), " " + words[-1]


def lambada_examples(texts, tokenizer, seq_length: int):
    """([(context ids, target ids)], skipped, truncated). Skipped: a text of fewer than 2 words, or
    whose context or target tokenizes to nothing, or whose target is longer than the window. A
    context too long for the window (context + target - 1 > seq_length) keeps its last tokens.

    Target ids = tokenize(context + target)[len(tokenize(context)):], as lm-evaluation-harness
    splits a context/continuation pair: tokenized alone, " word" would get a SentencePiece model's
    dummy-prefix piece ("▁" + "▁word"), a token that never follows the context in running text."""
    examples, skipped, truncated = [], 0, 0
    for text in texts:
        parts = split_last_word(text)
        context, target = [], []
        if parts:
            context = tokenizer.tokenize(parts[0])
            target = tokenizer.tokenize(parts[0] + parts[1])[len(context):]
        if not context or not target or len(target) > seq_length:
            skipped += 1
            continue
        room = seq_length + 1 - len(target)
        if len(context) > room:
            context, truncated = context[-room:], truncated + 1
        examples.append((context, target))
    return examples, skipped, truncated


def build_tokenizer(saved_args: dict, given: dict, vocab_size: int, saved_identity=None):
    """The tokenizer the checkpoint was trained with: its saved flags, each replaced by one given
    here (e.g. a moved --tokenizer-model), checked against the checkpoint's vocabulary size."""
    from megatron_patch.training import data

    flags = {k: saved_args.get(k) for k in TOKENIZER_FLAGS}
    flags.update({k: v for k, v in given.items() if v is not None})
    if flags["tokenizer_type"] is None:
        raise SetupError("the checkpoint names no tokenizer; pass --tokenizer-type (with --tokenizer-model, "
                         "or --vocab-file and --merge-file) as given to pretrain_gpt.py")
    if flags["tokenizer_type"] == "NullTokenizer" and flags["vocab_size"] is None:
        raise SetupError("--tokenizer-type NullTokenizer needs --vocab-size")
    tokenizer = data.build_tokenizer(SimpleNamespace(**flags))
    if tokenizer.vocab_size != vocab_size:
        raise SetupError(f"the tokenizer ({flags['tokenizer_type']}) has {tokenizer.vocab_size} ids, but the "
                         f"checkpoint was trained with {vocab_size}; pass the tokenizer it was trained with")
    check_tokenizer(saved_identity, data.tokenizer_identity(SimpleNamespace(**flags), tokenizer), "this tokenizer")
    return tokenizer


def check_tokenizer(saved_identity, identity, what: str) -> None:
    """Refuse a tokenizer (or data made with one) that differs from the one the checkpoint was
    trained with (its identity: type, size, sha256 of its files), even one of the same size: the
    model would score other ids, and the perplexity would be meaningless. Checkpoints written
    before identities were saved, and data without a record, pass."""
    from megatron_patch.data_identity import identity_differences

    differences = identity_differences(saved_identity, identity) if saved_identity and identity else []
    if differences:
        raise SetupError(f"{what} differs from the tokenizer the checkpoint was trained with "
                         f"(the checkpoint's vs this: {'; '.join(differences)}); "
                         "pass the run's tokenizer, or data made with it")
