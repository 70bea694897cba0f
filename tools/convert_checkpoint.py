#!/usr/bin/env python
"""Convert checkpoints between megatron_patch's trainer and Hugging Face transformers (GPT-2, Llama).

  python tools/convert_checkpoint.py --load CKPT_DIR --to hf --output HF_DIR [--ckpt-step N]
  python tools/convert_checkpoint.py --from hf --load HF_DIR --output CKPT_DIR

Export reads a checkpoint of any TP/PP layout into one process (megatron-core resharding), folds
WeSaR gates and Scaled Embed into the weights, and writes a model + tokenizer directory loadable
offline with AutoModelForCausalLM / AutoTokenizer.from_pretrained: GPT2LMHeadModel for GPT-2-shaped
models, LlamaForCausalLM for RMSNorm + SwiGLU + RoPE (+ GQA) ones. Options neither represents
(Embed LN, QK-LN, post-LN, partial RoPE, ...) stop with one line naming them, and nothing is
written. Import (GPT-2 or Llama) writes an iteration-0, model-only checkpoint that pretrain_gpt.py
--load continues from at any layout. See docs/export.md.
"""

import argparse
import sys
import warnings

# Upstream import-time and loading noise (as in tools/evaluate.py): keeps the result to one line.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)

from megatron_patch import interrupts  # noqa: E402

if __name__ == "__main__":  # Ctrl-C while torch and megatron-core import: one line
    interrupts.during_startup("convert_checkpoint.py")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Trainer checkpoint dir (export) or HF dir (import).")
    p.add_argument("--output", required=True)
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="Export the trainer checkpoint to this format.")
    direction.add_argument("--from", dest="from_", choices=["hf"], help="Import from this format.")
    p.add_argument("--ckpt-step", type=int, default=None, help="Export this iteration, not the latest.")
    p.add_argument("--overwrite-checkpoints", action="store_true",
                   help="Import into an --output that already holds a trainer run, replacing its checkpoints.")
    args = p.parse_args(argv)

    from megatron_patch.export import ExportError
    from megatron_patch.export.convert import export_to_hf, import_from_hf
    from megatron_patch.training.errors import SetupError

    try:
        if args.to:
            info = export_to_hf(args.load, args.output, args.ckpt_step)
            print(f"exported iteration {info['iteration']} to {info['output']} ({info['architecture']}, "
                  f"{'tied' if info['tied'] else 'untied'} output layer; folded: "
                  f"{', '.join(info['folded']) or 'nothing'}; tokenizer: {info['tokenizer']})")
        else:
            info = import_from_hf(args.load, args.output, overwrite=args.overwrite_checkpoints)
            print(f"wrote {info['output']} (iteration 0, model only). Continue with:\n"
                  f"  pretrain_gpt.py --load {args.output} {info['flags']} [data/tokenizer/training flags]")
    except (ExportError, SetupError, OSError) as exc:
        print(f"convert_checkpoint.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(interrupts.run_main("convert_checkpoint.py", main))
