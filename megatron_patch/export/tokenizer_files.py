"""The checkpoint's tokenizer, written next to the exported model, loadable offline with
`AutoTokenizer.from_pretrained(dir)` and checked against the trainer's tokenizer before it is kept.

- GPT2BPETokenizer (vocab.json + merges.txt): a transformers GPT2Tokenizer.
- SentencePieceTokenizer: a PreTrainedTokenizerFast built from the .model (sentencepiece_hf.py);
  the .model itself is kept as `tokenizer.model` for sentencepiece users.
- NullTokenizer (synthetic ids): nothing to write.
Returns a short note saying which, recorded in the export's config.
"""

import os
import shutil

from .errors import ExportError

# Spaces (leading, doubled, trailing), newlines, tabs, digits, punctuation, accents, CJK, emoji, and
# the literal names of special pieces: the cases where tokenizer conversions usually go wrong.
PROBES = ["Hello world.", " leading space", "two  spaces and trailing ", "line one\nline two\ttab",
          "1234567 + 89 = 1234656", "naïve café, Zürich – 1½ km²", "東京 🙂 ✓", "</s> <s> <unk> <pad>", ""]


def _gpt2(args, out_dir: str) -> None:
    import json

    from transformers import GPT2Tokenizer

    with open(args.vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(args.merge_file, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().splitlines()
                  if line.strip() and not line.startswith("#version")]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges,
                        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(out_dir)


def _portable_class_name(out_dir: str) -> None:
    """transformers 5 records the class as TokenizersBackend, which 4.x lacks; both versions load
    the same tokenizer.json as PreTrainedTokenizerFast."""
    import json

    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def check_ids(trainer_tokenizer, out_dir: str, eod: int, texts=PROBES) -> None:
    """The saved tokenizer, as AutoTokenizer loads it, must give the trainer's ids (and EOD as its
    eos id); raises ExportError on the first difference."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if hf.eos_token_id != eod:
        raise ExportError(f"the exported tokenizer's eos id is {hf.eos_token_id}, the trainer's end of "
                          f"document is {eod}; the tokenizer cannot be exported faithfully")
    for text in texts:
        ours, theirs = list(trainer_tokenizer.tokenize(text)), hf(text, add_special_tokens=True)["input_ids"]
        if ours != theirs:
            raise ExportError(f"the exported tokenizer encodes {text!r} as {theirs[:12]}, the trainer as "
                              f"{ours[:12]}; the tokenizer cannot be exported faithfully")


def export_tokenizer(args, out_dir: str, eod: int, model_max_length: int = None, saved_identity=None) -> str:
    kind = args.tokenizer_type
    if kind not in ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return f"none ({kind}: synthetic token ids)"
    from megatron_patch.training.data import build_tokenizer

    try:
        trainer = build_tokenizer(args)
    except Exception as exc:  # noqa: BLE001 - its files moved or are unreadable: name them
        raise ExportError(f"cannot read the checkpoint's tokenizer ({exc}); the export needs its files") from None
    from megatron_patch.evaluation.inputs import check_tokenizer
    from megatron_patch.training.data import tokenizer_identity
    from megatron_patch.training.errors import SetupError

    try:
        check_tokenizer(saved_identity, tokenizer_identity(args, trainer), "the tokenizer at the run's paths")
    except SetupError as exc:  # the file at that path was replaced since the run
        raise ExportError(str(exc)) from None
    if kind == "GPT2BPETokenizer":
        _gpt2(args, out_dir)
        note = "gpt2_bpe"
    else:
        from .sentencepiece_hf import hf_tokenizer

        hf_tokenizer(args.tokenizer_model, model_max_length).save_pretrained(out_dir)
        _portable_class_name(out_dir)
        shutil.copyfile(args.tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
        note = "sentencepiece"
    check_ids(trainer, out_dir, eod)
    return f"{note}: AutoTokenizer.from_pretrained(dir), ids as the trainer's; end of document id {eod}"
