"""export_to_hf / import_from_hf: what tools/convert_checkpoint.py runs.

GPT-2-shaped models (LayerNorm, GELU, learned positions) export to GPT2LMHeadModel, Llama-shaped
ones (RMSNorm, SwiGLU, RoPE, GQA) to LlamaForCausalLM; check_exportable decides. The export is
written to a temporary sibling directory and renamed into place only when complete.
"""

import json
import os
import shutil
import tempfile

import torch

from . import llama, megatron_io
from .errors import ExportError
from .hf import gpt2_config, hf_to_megatron_state, megatron_to_hf_state
from .hf import unsupported_options as gpt2_unsupported_options
from .tokenizer_files import export_tokenizer

TARGETS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def check_exportable(config, args) -> str:
    """The export target, "gpt2" or "llama": the one that represents every option of the model.
    Raises ExportError naming the flags each target lacks (GPT-2's alone for a model that uses none
    of RMSNorm, SwiGLU, RoPE)."""
    embed_ln = ["--embed-layernorm (Embed LN: neither GPT-2 nor Llama has a norm on the embedding output)"] \
        if config.embed_layernorm else []
    gpt2 = gpt2_unsupported_options(config, args) + embed_ln
    llama_bad = llama.unsupported_options(config, args) + embed_ln
    if not gpt2:
        return "gpt2"
    if not llama_bad:
        return "llama"
    llama_shaped = (config.normalization == "RMSNorm" or config.gated_linear_unit
                    or args.position_embedding_type == "rope")
    message = "cannot export to GPT-2: the checkpoint uses " + "; ".join(gpt2)
    if llama_shaped:
        message += "; nor to Llama: the checkpoint uses " + "; ".join(llama_bad)
    raise ExportError(message)


def _eod(args, vocab_size):
    """End-of-document id of the checkpoint's tokenizer (its files may be gone: then vocab - 1)."""
    if args.tokenizer_type == "NullTokenizer":
        return int(args.vocab_size)
    try:
        from megatron_patch.training.data import build_tokenizer

        return int(build_tokenizer(args).eod)
    except Exception:  # noqa: BLE001 - only a default for the config's eos id
        return vocab_size - 1


def _model_class(target):
    import transformers

    return getattr(transformers, TARGETS[target])


def _check_output(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (
            os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "config.json")))):
        raise ExportError(f"--output {out_dir} exists and is not a model directory; choose a new or empty "
                          "directory (an earlier export there is replaced)")


def _publish(tmp: str, out_dir: str) -> None:
    """Put the finished export at out_dir, replacing an earlier export there, but never a file
    this export does not write (a user's notes, another model's weights): refused, tmp removed."""
    old = None
    if os.path.exists(out_dir):
        theirs = sorted(set(os.listdir(out_dir)) - set(os.listdir(tmp)))
        if theirs:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(f"--output {out_dir} holds files this export does not write ({', '.join(theirs[:5])}"
                              f"{', ...' if len(theirs) > 5 else ''}), which replacing it would delete; choose a "
                              "new or empty directory, or move them")
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old.", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export_to_hf(load_dir: str, out_dir: str, step=None) -> dict:
    """Write a transformers model directory (config, safetensors, tokenizer) for the checkpoint in
    `load_dir` (any TP/PP layout). Raises ExportError for options neither target represents."""
    from megatron_patch.training.model_builder import transformer_config_from_args

    out_dir = os.path.abspath(out_dir)
    _check_output(out_dir)
    _, common = megatron_io.read_common(load_dir, step)
    args = megatron_io.args_from_saved(common["args"])
    target = check_exportable(transformer_config_from_args(args), args)  # before any tensor is read
    with megatron_io.loaded_checkpoint(load_dir, step) as (model, args, common):
        config = model.config
        if target == "gpt2":
            state, tied = megatron_to_hf_state(model, config)
        else:
            state, tied = llama.megatron_to_llama_state(model, config)
    folded = [name for name, on in (("wesar", config.wesar), ("scaled_embed", config.scaled_embed)) if on]
    eod = _eod(args, common["vocab_size"])
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp.", dir=os.path.dirname(out_dir))
    try:
        note = export_tokenizer(args, tmp, eod, args.max_position_embeddings, common.get("tokenizer_identity"))
        make_config = gpt2_config if target == "gpt2" else llama.llama_config
        hf_config = make_config(config, args, dict(common, eod=eod), tied, extra=dict(folded=folded, tokenizer=note))
        hf_model = _model_class(target)(hf_config)
        missing, unexpected = hf_model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"{TARGETS[target]} mapping incomplete: missing {missing}, unexpected {unexpected}")
        hf_model.save_pretrained(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(output=out_dir, iteration=common["iteration"], tied=tied, folded=folded, tokenizer=note,
                architecture=TARGETS[target])


def _args_from_gpt2_config(hf) -> dict:
    """Trainer flags for a GPT-2 config that did not come from this package."""
    return dict(num_layers=hf.n_layer, hidden_size=hf.n_embd, num_attention_heads=hf.n_head,
                ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, max_position_embeddings=hf.n_positions,
                seq_length=hf.n_positions, norm_epsilon=hf.layer_norm_epsilon,
                hidden_dropout=hf.resid_pdrop, attention_dropout=hf.attn_pdrop,
                tokenizer_type="NullTokenizer", vocab_size=hf.vocab_size - 1)


def _gpt2_problems(hf) -> list:
    checks = [(f"activation_function {hf.activation_function!r} (the trainer's GELU is the exact erf one, "
               "'gelu')", hf.activation_function != "gelu"),
              ("non-standard attention scaling", hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights)]
    return [name for name, bad in checks if bad]


# Model-shaping flags (trainer flag, args attribute), printed for the run that continues an import.
_FLAGS = [("--num-layers", "num_layers"), ("--hidden-size", "hidden_size"),
          ("--num-attention-heads", "num_attention_heads"), ("--ffn-hidden-size", "ffn_hidden_size"),
          ("--kv-channels", "kv_channels"), ("--max-position-embeddings", "max_position_embeddings"),
          ("--norm-epsilon", "norm_epsilon"), ("--normalization", "normalization"),
          ("--position-embedding-type", "position_embedding_type"), ("--rotary-base", "rotary_base"),
          ("--group-query-attention", "group_query_attention"), ("--num-query-groups", "num_query_groups"),
          ("--swiglu", "swiglu"), ("--disable-bias-linear", "disable_bias_linear"),
          ("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights")]


def model_flags(args, target: str) -> str:
    skip = {"num_query_groups"} if not args.group_query_attention else set()
    if target != "llama":
        skip |= {"normalization", "position_embedding_type", "rotary_base"}
    flags = []
    for flag, attr in _FLAGS:
        value = getattr(args, attr, None)
        if attr in skip or value is None or value is False:
            continue
        flags += [flag] if value is True else [flag, str(value)]
    return " ".join(flags)


def import_from_hf(hf_dir: str, save_dir: str, overwrite: bool = False) -> dict:
    """Write a trainer checkpoint (iteration 0, model only) from a GPT-2 or Llama directory. The model
    is the exported function in plain form: WeSaR gates and Scaled Embed stay folded into the
    weights, so the continued run must not pass --wesar / --scaled-embed (see `flags` in the result)."""
    from transformers import AutoConfig

    from megatron_patch.training import checkpointing

    if not os.path.isdir(hf_dir):
        raise ExportError(f"--load {hf_dir}: no such directory (a Hugging Face model directory with config.json)")
    if os.path.isfile(os.path.join(hf_dir, checkpointing.TRACKER)) or checkpointing.is_iteration_dir(hf_dir):
        raise ExportError(f"--load {hf_dir} is a trainer checkpoint, not a Hugging Face directory; export it "
                          "with --to hf, or resume it with pretrain_gpt.py --load")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ExportError(f"--load {hf_dir} has no config.json: not a Hugging Face model directory")
    if not overwrite and os.path.isfile(os.path.join(save_dir, checkpointing.TRACKER)):
        raise ExportError(f"--output {save_dir} already holds a trainer run; choose another --output, or pass "
                          "--overwrite-checkpoints to replace it")
    hf = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    target = {"gpt2": "gpt2", "llama": "llama"}.get(hf.model_type)
    if target is None:
        raise ExportError(f"{hf_dir}: model_type {hf.model_type!r}; only GPT-2 and Llama directories import")
    problems = _gpt2_problems(hf) if target == "gpt2" else llama.import_problems(hf)
    if problems:
        raise ExportError(f"{hf_dir}: cannot import {'; '.join(problems)}")
    meta = getattr(hf, "megatron_patch", None) or {}
    derived = _args_from_gpt2_config(hf) if target == "gpt2" else llama.args_from_llama_config(hf)
    saved = dict(meta.get("args") or derived)
    saved.update(scaled_embed=False, wesar=False, wesar_init_std=None,
                 untie_embeddings_and_output_weights=not hf.tie_word_embeddings)
    args = megatron_io.args_from_saved(saved)
    vocab_size, padded = int(meta.get("vocab_size", hf.vocab_size)), int(hf.vocab_size)
    hf_state = _model_class(target).from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).state_dict()
    megatron_io.start_single_process(args)
    try:
        model = megatron_io.build_model(args, padded)
        template = model.state_dict()
        if target == "gpt2":
            state = hf_to_megatron_state(hf_state, template, args.num_layers, args.num_attention_heads)
        else:
            groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
            state = llama.llama_to_megatron_state(hf_state, template, args.num_layers, args.num_attention_heads,
                                                  groups)
        model.load_state_dict(state, strict=True)
        path = megatron_io.save_model_checkpoint(model, args, save_dir, vocab_size, padded)
    finally:
        megatron_io.stop()
    flags = model_flags(args, target)
    with open(os.path.join(save_dir, "imported_from.json"), "w") as f:
        json.dump(dict(source=os.path.abspath(hf_dir), flags=flags, vocab_size=vocab_size,
                       padded_vocab_size=padded, architecture=TARGETS[target]), f, indent=1)
    return dict(output=path, flags=flags, vocab_size=vocab_size, padded_vocab_size=padded)
