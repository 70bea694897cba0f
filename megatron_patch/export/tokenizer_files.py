"""The checkpoint's tokenizer, written next to the exported model.

- GPT2BPETokenizer (vocab.json + merges.txt): a transformers GPT2Tokenizer, loadable with
  AutoTokenizer.from_pretrained(dir) offline.
- SentencePieceTokenizer: the .model is copied as `tokenizer.model`; transformers 5 has no
  generic wrapper that reproduces plain SentencePieceProcessor.EncodeAsIds (its sentencepiece
  converters add Llama/T5 prefix-space and special-token rules), so load it with sentencepiece
  (or megatron_patch.tokenizer) — see docs/export.md.
- NullTokenizer (synthetic ids): nothing to write.
Returns a short note saying which, recorded in the export's config.
"""

import os
import shutil


def export_tokenizer(args, out_dir: str, eod: int) -> str:
    kind = args.tokenizer_type
    if kind == "GPT2BPETokenizer":
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
        return "gpt2_bpe: AutoTokenizer.from_pretrained(dir)"
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        shutil.copyfile(args.tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
        return ("sentencepiece: sentencepiece.SentencePieceProcessor(model_file=dir/tokenizer.model)"
                f".encode(text); end of document id {eod}")
    return f"none ({kind}: synthetic token ids)"
