#!/usr/bin/env python
"""Evaluate a trainer checkpoint: perplexity on held-out text, or LAMBADA last-word accuracy.

  python tools/evaluate.py --load CKPT_DIR --data-path PREFIX            # PREFIX.bin/.idx
  python tools/evaluate.py --load CKPT_DIR --input test.jsonl            # or .txt, one doc per line
  python tools/evaluate.py --load CKPT_DIR --input lambada.jsonl --task lambada

The model is read from the checkpoint (any TP/PP layout, loaded whole into one process, fp32) and
built from its saved flags, stabilization options included; so is the tokenizer, unless
--tokenizer-* flags replace it.

perplexity: the documents are concatenated (a .bin/.idx as stored, i.e. with the EOD that
preprocess_data.py --append-eod wrote; --input documents tokenized, each followed by EOD) and
cut into non-overlapping windows of the model's seq length; every token but the first is
predicted once, from the earlier tokens of its window. --stride K < seq length slides the windows
by K instead, so each prediction has at least seq length - K tokens of context. Reported: tokens
predicted, mean NLL (nats), perplexity = exp(mean NLL).

lambada: per {"text": ...} line, context = the text without its last whitespace-separated word,
target = " " + that word, tokenized as lm-evaluation-harness does: the target's ids are those that
tokenizing context + target adds to the context's ids. Correct iff the greedy prediction equals
every target token. Reported: accuracy, word perplexity (exp of the mean per-example NLL of the
target), token perplexity. Texts of fewer than 2 words are skipped and counted. See
docs/evaluate.md and docs/lm_eval.md.
"""

import argparse
import json
import os
import sys
import warnings

# Upstream import-time noise (see pretrain_gpt.py): keeps errors to one line on stderr.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
# dist_checkpointing's load calls torch APIs torch has deprecated: nothing the user can act on.
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)

from megatron_patch import interrupts  # noqa: E402

if __name__ == "__main__":  # Ctrl-C while torch and megatron-core import: one line
    interrupts.during_startup("evaluate.py")
from megatron_patch.documents import DataError, check_input, iter_documents  # noqa: E402
from megatron_patch.training.errors import SetupError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 1, as every other error
        raise SetupError(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Checkpoint directory (pretrain_gpt.py --save).")
    p.add_argument("--ckpt-step", type=int, default=None, help="Evaluate this iteration, not the latest.")
    p.add_argument("--task", choices=["perplexity", "lambada"], default="perplexity")
    p.add_argument("--data-path", default=None, help="Prefix of a .bin/.idx pair (perplexity only).")
    p.add_argument("--input", default=None, help="jsonl, or plain text with one document per line.")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: text for .txt, else jsonl (as preprocess_data.py).")
    p.add_argument("--json-key", default="text")
    p.add_argument("--seq-length", type=int, default=None, help="Window length (default: the checkpoint's).")
    p.add_argument("--stride", type=int, default=None, help="Sliding windows (default: seq length, no overlap).")
    p.add_argument("--micro-batch-size", type=int, default=8, help="Windows per forward pass.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available.")
    p.add_argument("--output-json", default=None, help="Also write the results to this file.")
    g = p.add_argument_group("tokenizer", "Default: the checkpoint's saved flags; each given flag replaces one.")
    g.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                                "GPT2BPETokenizer", "NullTokenizer"])
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--vocab-size", type=int)
    return p.parse_args(argv)


def check_args(args) -> None:
    """Everything that needs no checkpoint or model read (fails in a second)."""
    if not os.path.isdir(args.load):
        raise SetupError(f"--load {args.load}: no such directory; pass a pretrain_gpt.py --save directory")
    if args.data_path and args.input:
        raise SetupError("--data-path and --input are exclusive: evaluate one data set per run")
    if not args.data_path and not args.input:
        raise SetupError("no data: pass --data-path PREFIX (a .bin/.idx pair) or --input FILE (jsonl or text)")
    if args.task == "lambada" and args.data_path:
        raise SetupError("--task lambada needs the texts: pass --input FILE.jsonl instead of --data-path")
    if args.data_path:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(args.data_path + ext):
                raise SetupError(f"--data-path: {args.data_path + ext} not found (give the prefix without "
                                 ".bin/.idx; make it with tools/preprocess_data.py)")
    else:
        check_input(args.input)
    if args.output_json and os.path.isdir(args.output_json):
        raise SetupError(f"--output-json {args.output_json} is a directory; give a file name")
    if args.output_json and not os.path.isdir(os.path.dirname(os.path.abspath(args.output_json))):
        raise SetupError(f"--output-json {args.output_json}: its directory does not exist; create it first")
    for flag in ("seq_length", "stride", "micro_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SetupError(f"--{flag.replace('_', '-')} must be at least 1")


def device_for(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda: no CUDA device here; use --device cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def window_length(args, saved: dict) -> int:
    seq = args.seq_length or saved["seq_length"]
    if saved.get("position_embedding_type", "learned_absolute") == "learned_absolute" \
            and seq > saved["max_position_embeddings"]:
        raise SetupError(f"--seq-length {seq} exceeds the model's {saved['max_position_embeddings']} positions")
    if args.stride is not None and args.stride > seq:
        raise SetupError(f"--stride {args.stride} exceeds the window ({seq} tokens); use at most {seq}")
    return seq


def read_data(args, common: dict, seq: int):
    """Token ids (perplexity) or (examples, skipped, truncated) (lambada); refuses empty data."""
    from megatron_patch.evaluation import inputs

    if args.data_path:
        from megatron_patch.data_identity import read_tokenizer_identity

        inputs.check_tokenizer(common.get("tokenizer_identity"), read_tokenizer_identity(args.data_path),
                               f"the tokenizer {args.data_path} was made with")
        tokens = inputs.indexed_tokens(args.data_path)
    else:
        given = {k: getattr(args, k) for k in inputs.TOKENIZER_FLAGS}
        tokenizer = inputs.build_tokenizer(common["args"], given, common["vocab_size"],
                                           common.get("tokenizer_identity"))
        texts = [t[0] for t in iter_documents(args.input, [args.json_key], args.input_format)]
        if args.task == "lambada":
            examples, skipped, truncated = inputs.lambada_examples(texts, tokenizer, seq)
            if not examples:
                raise SetupError(f"--input {args.input}: no text of at least 2 words ({skipped} skipped); "
                                 f"pass a jsonl of {{\"{args.json_key}\": ...}} lines")
            return examples, skipped, truncated
        tokens = inputs.document_tokens(texts, tokenizer)
    if len(tokens) < 2:
        raise SetupError(f"{args.data_path or args.input}: {len(tokens)} tokens (empty documents are skipped); "
                         "perplexity needs at least 2")
    inputs.check_ids(tokens, common["vocab_size"], args.data_path or args.input)
    return tokens


def evaluate(args) -> dict:
    from megatron_patch.evaluation import scoring
    from megatron_patch.export import megatron_io

    device = device_for(args.device)
    path, common = megatron_io.read_common(args.load, args.ckpt_step)
    seq = window_length(args, common["args"])
    data = read_data(args, common, seq)  # before the weights: bad data fails fast
    result = dict(task=args.task, checkpoint=path, iteration=common["iteration"],
                  data=args.data_path or args.input, seq_length=seq)
    with megatron_io.loaded_checkpoint(args.load, args.ckpt_step) as (model, _, _):
        model.to(device)

        def logits_fn(tokens):
            return megatron_io.megatron_logits(model, tokens.to(device))

        if args.task == "perplexity":
            result.update(stride=args.stride or seq)
            result.update(scoring.perplexity(data, logits_fn, seq, args.stride, args.micro_batch_size))
        else:
            examples, skipped, truncated = data
            result.update(skipped=skipped, truncated=truncated)
            result.update(scoring.lambada(examples, logits_fn, args.micro_batch_size))
    return result


def report(r: dict) -> str:
    head = f"{r['checkpoint']} (iteration {r['iteration']}) on {r['data']}, window {r['seq_length']}"
    if r["task"] == "perplexity":
        return (f"{head}, stride {r['stride']}\ntokens: {r['tokens']} | mean NLL: {r['mean_nll']:.6f} | "
                f"perplexity: {r['perplexity']:.4f}")
    return (f"{head}\nexamples: {r['examples']} (skipped {r['skipped']}, context truncated {r['truncated']}) | "
            f"accuracy: {r['accuracy']:.4f} ({r['correct']}/{r['examples']}) | word perplexity: "
            f"{r['word_perplexity']:.4f} | token perplexity: {r['token_perplexity']:.4f} "
            f"({r['target_tokens']} target tokens)")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        result = evaluate(args)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(result, f, indent=1)
    except (SetupError, DataError, OSError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_main("evaluate.py", main))
