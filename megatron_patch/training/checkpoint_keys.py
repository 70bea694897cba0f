"""Model state across layer implementations: Transformer Engine (TE) and megatron-core's local layers.

The weights already share one naming: megatron-core's local layer spec maps its norm names to
TE's in the sharded state dict (`sharded_state_dict_keys_map`: `input_layernorm.` is saved as
`self_attention.linear_qkv.layer_norm_`, `pre_mlp_layernorm.` as `mlp.linear_fc1.layer_norm_`),
and the linear layers of both carry an `_extra_state` entry. What differs is only `_extra_state`:
  - TE modules keep fp8 metadata there (an empty uint8 tensor when fp8 is off); megatron-core's
    local linears write None and ignore what they are given;
  - some modules have it on one side only: with TE importable the block's final norm is TE's
    (`decoder.final_layernorm._extra_state`), and Embed LN's norm under TE too;
  - TE's attention (`core_attention._extra_state`) is never in megatron-core's sharded state
    dict, so a model with TE layers never finds it in any checkpoint.
So a load may leave `_extra_state` entries behind in either direction, and nothing else: every
weight must be found, or the load is refused with the names of what is missing.
"""

import re

import torch

from .errors import SetupError


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def _module_names(keys, limit=3) -> str:
    """'decoder.layers.*.self_attention.core_attention, ...' for a set of `_extra_state` keys."""
    names = sorted({re.sub(r"\.layers\.\d+\.", ".layers.*.", k).rsplit("._extra_state", 1)[0]
                    .removesuffix("_extra_state") for k in keys})
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_sharded(sharded_state_dict: dict, path: str, strategy=None):
    """dist_checkpointing.load that tolerates `_extra_state` present on one side only.

    Returns (state dict, notes): `notes` lists what was not carried over (empty if everything
    was). Raises SetupError naming the tensors this model needs and the checkpoint lacks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    _refuse_shape_mismatches(sharded_state_dict, path)
    # megatron-core's naming: "unexpected" = requested but absent from the checkpoint (removed from
    # the request), "missing" = in the checkpoint but not requested.
    loaded, in_checkpoint_only, absent = dist_checkpointing.load(
        sharded_state_dict, path, strategy, strict=StrictHandling.RETURN_ALL)
    # Model tensors first: optimizer state keys name the same tensors again.
    lacking = sorted((k for k in absent if not _is_extra_state(k)), key=lambda k: (k.startswith("optimizer."), k))
    if lacking:
        more = f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""
        raise SetupError(f"checkpoint {path} lacks {', '.join(lacking[:4])}{more}, which this run needs: "
                         "it was saved with other model flags (compare the checkpoint's saved args)")
    notes = []
    ckpt_extra = [k for k in in_checkpoint_only if _is_extra_state(k)]
    if ckpt_extra:
        notes.append(f"extra state of {_module_names(ckpt_extra)} (in the checkpoint, not in this model)")
    model_extra = [k for k in absent if _is_extra_state(k)]
    if model_extra:
        notes.append(f"extra state of {_module_names(model_extra)} (not in the checkpoint: left as initialised)")
    return loaded, notes


# Which flag most likely makes a model tensor's shape differ, by a piece of its key.
_SHAPE_FLAGS = (("word_embeddings", "the vocabulary (tokenizer, --make-vocab-size-divisible-by)"),
                ("output_layer", "the vocabulary (tokenizer, --make-vocab-size-divisible-by)"),
                ("position_embeddings", "--max-position-embeddings"),
                ("linear_qkv", "--num-attention-heads / --kv-channels / --num-query-groups"),
                ("linear_proj", "--num-attention-heads / --kv-channels"),
                ("linear_fc1", "--ffn-hidden-size / --swiglu"), ("linear_fc2", "--ffn-hidden-size"),
                ("decoder.layers.", "--num-layers"))


def _refuse_shape_mismatches(sharded_state_dict, path) -> None:
    """Name model tensors whose global shape differs from the checkpoint's (megatron-core would
    only say "CheckpointException ranks: ..."), with the flag that probably differs."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(path)
    seen, wrong = set(), []
    for tensor in nested_values(sharded_state_dict):
        if not isinstance(tensor, ShardedTensor) or tensor.key.startswith("optimizer.") or tensor.key in seen:
            continue
        seen.add(tensor.key)
        old = saved.get(tensor.key)
        if old is not None and tuple(old.global_shape) != tuple(tensor.global_shape):
            flag = next((f for piece, f in _SHAPE_FLAGS if piece in tensor.key), "--hidden-size")
            wrong.append(f"{tensor.key} is {tuple(old.global_shape)} in the checkpoint, {tuple(tensor.global_shape)} "
                         f"here (check {flag})")
    if wrong:
        raise SetupError(f"checkpoint {path} does not fit this model: {'; '.join(wrong[:3])}"
                         + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))


def _has_content(extra_state) -> bool:
    """TE's extra state holds fp8 metadata; an empty tensor (or None, megatron's) holds nothing."""
    if extra_state is None:
        return False
    if torch.is_tensor(extra_state):
        return extra_state.numel() > 0
    if hasattr(extra_state, "getbuffer"):  # io.BytesIO of older TE versions
        return extra_state.getbuffer().nbytes > 0
    return True


def load_module_state(module: torch.nn.Module, state_dict: dict) -> list:
    """module.load_state_dict, strict except for `_extra_state`; returns notes as load_sharded."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    dropped = [f"{name}._extra_state" for name, sub in module.named_modules()
               if isinstance(sub, (ColumnParallelLinear, RowParallelLinear))
               and _has_content(state_dict.get(f"{name}._extra_state"))]
    result = module.load_state_dict(state_dict, strict=False)
    wrong = [k for k in result.missing_keys if not _is_extra_state(k)] + list(result.unexpected_keys)
    if wrong:
        raise SetupError(f"checkpoint state does not fit the model: {', '.join(sorted(wrong)[:4])}")
    return [f"Transformer Engine fp8 metadata of {_module_names(dropped)} (local layers keep none)"] if dropped else []


def notice(path: str, notes) -> str:
    """One line for the log, or '' when everything was carried over."""
    return f" > checkpoint {path}: not carried over: " + "; ".join(notes) if notes else ""
