"""export_to_hf / import_from_hf: what tools/convert_checkpoint.py runs."""

import json
import os

import torch

from . import megatron_io
from .hf import ExportError, check_exportable, gpt2_config, hf_to_megatron_state, megatron_to_hf_state
from .tokenizer_files import export_tokenizer


def _eod(args, vocab_size):
    """End-of-document id of the checkpoint's tokenizer (its files may be gone: then vocab - 1)."""
    if args.tokenizer_type == "NullTokenizer":
        return int(args.vocab_size)
    try:
        from megatron_patch.training.data import build_tokenizer

        return int(build_tokenizer(args).eod)
    except Exception:  # noqa: BLE001 - only a default for the config's eos id
        return vocab_size - 1


def export_to_hf(load_dir: str, out_dir: str, step=None) -> dict:
    """Write a transformers GPT2LMHeadModel directory (config, safetensors, tokenizer) for the
    checkpoint in `load_dir` (any TP/PP layout). Raises ExportError for options GPT-2 lacks."""
    from transformers import GPT2LMHeadModel

    _, common = megatron_io.read_common(load_dir, step)
    args = megatron_io.args_from_saved(common["args"])
    from megatron_patch.training.model_builder import transformer_config_from_args

    check_exportable(transformer_config_from_args(args), args)  # before any tensor is read
    with megatron_io.loaded_checkpoint(load_dir, step) as (model, args, common):
        config = model.config
        state, tied = megatron_to_hf_state(model, config)
    folded = [name for name, on in (("wesar", config.wesar), ("scaled_embed", config.scaled_embed)) if on]
    os.makedirs(out_dir, exist_ok=True)
    eod = _eod(args, common["vocab_size"])
    note = export_tokenizer(args, out_dir, eod)
    hf_config = gpt2_config(config, args, dict(common, eod=eod), tied, extra=dict(folded=folded, tokenizer=note))
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 mapping incomplete: missing {missing}, unexpected {unexpected}")
    hf_model.save_pretrained(out_dir)
    return dict(output=out_dir, iteration=common["iteration"], tied=tied, folded=folded, tokenizer=note)


def _args_from_gpt2_config(hf) -> dict:
    """Trainer flags for a GPT-2 config that did not come from this package."""
    return dict(num_layers=hf.n_layer, hidden_size=hf.n_embd, num_attention_heads=hf.n_head,
                ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, max_position_embeddings=hf.n_positions,
                seq_length=hf.n_positions, norm_epsilon=hf.layer_norm_epsilon,
                hidden_dropout=hf.resid_pdrop, attention_dropout=hf.attn_pdrop,
                tokenizer_type="NullTokenizer", vocab_size=hf.vocab_size - 1)


def import_from_hf(hf_dir: str, save_dir: str, overwrite: bool = False) -> dict:
    """Write a trainer checkpoint (iteration 0, model only) from a GPT-2 directory. The model is the
    exported function in plain form: WeSaR gates and Scaled Embed stay folded into the weights, so
    the continued run must not pass --wesar / --scaled-embed (see `flags` in the result)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from megatron_patch.training import checkpointing

    if not os.path.isdir(hf_dir):
        raise ExportError(f"--load {hf_dir}: no such directory (a Hugging Face model directory with config.json)")
    if os.path.isfile(os.path.join(hf_dir, checkpointing.TRACKER)) or os.path.isfile(os.path.join(hf_dir, "common.pt")):
        raise ExportError(f"--load {hf_dir} is a trainer checkpoint, not a Hugging Face directory; export it "
                          "with --to hf, or resume it with pretrain_gpt.py --load")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ExportError(f"--load {hf_dir} has no config.json: not a Hugging Face model directory")
    if not overwrite and os.path.isfile(os.path.join(save_dir, checkpointing.TRACKER)):
        raise ExportError(f"--output {save_dir} already holds a trainer run; choose another --output, or pass "
                          "--overwrite-checkpoints to replace it")
    hf = GPT2Config.from_pretrained(hf_dir)
    if hf.model_type != "gpt2":
        raise ExportError(f"{hf_dir}: model_type {hf.model_type!r}; only GPT-2 directories import")
    if hf.activation_function != "gelu":
        raise ExportError(f"{hf_dir}: activation_function {hf.activation_function!r}; the trainer's "
                          "GELU is the exact (erf) one, 'gelu'")
    if hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights:
        raise ExportError(f"{hf_dir}: non-standard attention scaling cannot be imported")
    meta = getattr(hf, "megatron_patch", None) or {}
    saved = dict(meta.get("args") or _args_from_gpt2_config(hf))
    saved.update(scaled_embed=False, wesar=False, wesar_init_std=None,
                 untie_embeddings_and_output_weights=not hf.tie_word_embeddings)
    args = megatron_io.args_from_saved(saved)
    vocab_size, padded = int(meta.get("vocab_size", hf.vocab_size)), int(hf.vocab_size)
    hf_state = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    megatron_io.start_single_process(args)
    try:
        model = megatron_io.build_model(args, padded)
        state = hf_to_megatron_state(hf_state, model.state_dict(), args.num_layers, args.num_attention_heads)
        model.load_state_dict(state, strict=True)
        path = megatron_io.save_model_checkpoint(model, args, save_dir, vocab_size, padded)
    finally:
        megatron_io.stop()
    flags = (f"--num-layers {args.num_layers} --hidden-size {args.hidden_size} "
             f"--num-attention-heads {args.num_attention_heads} --ffn-hidden-size {hf.n_inner or 4 * hf.n_embd} "
             f"--max-position-embeddings {args.max_position_embeddings} --norm-epsilon {args.norm_epsilon}"
             + (" --untie-embeddings-and-output-weights" if not hf.tie_word_embeddings else ""))
    with open(os.path.join(save_dir, "imported_from.json"), "w") as f:
        json.dump(dict(source=os.path.abspath(hf_dir), flags=flags, vocab_size=vocab_size,
                       padded_vocab_size=padded), f, indent=1)
    return dict(output=path, flags=flags, vocab_size=vocab_size, padded_vocab_size=padded)
