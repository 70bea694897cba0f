"""Per-layer gradient and weight norms by parameter group, reduced across TP and PP ranks.

Groups: per Transformer layer (global layer number, 1-based) "attention", "ffn", "ln" (the
layer's norms) and "gate" (WeSaR gates); plus "embedding" (tables and the Embed LN), "final_ln"
and "output_layer". Every rank fills the same fixed vector of squared norms; parameters that are
replicated across TP ranks are counted on TP rank 0 only and tied embeddings once, then one
all-reduce over the model-parallel group completes it. The squares add up to the global gradient
norm that megatron-core's clipping computes.

Gradients are read from the DDP `main_grad` buffers after `finalize_model_grads` (i.e. in the
trainer's on_before_optimizer_step), divided by the loss scale. With the distributed optimizer
the reduce-scatter completes only this rank's shard of each buffer: each rank then sums the
squares over the ranges of each parameter it owns (the optimizer's own range map), and the sum
runs over the optimizer's grad-stats group (all its DP x TP x PP ranks) instead of the
model-parallel group, as megatron-core's own gradient clipping does.
"""

from typing import Dict, List, Sequence, Tuple

import torch

LAYER_GROUPS = ("attention", "ffn", "ln", "gate")
MODEL_GROUPS = ("embedding", "final_ln", "output_layer")


def group_keys(num_layers: int) -> List[Tuple]:
    """The fixed order of the reduced vector: (layer, group) pairs, then model-level groups."""
    return [(layer, g) for layer in range(1, num_layers + 1) for g in LAYER_GROUPS] + \
        [(None, g) for g in MODEL_GROUPS]


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def is_norm_parameter(name: str) -> bool:
    """A norm's weight or bias, by module and parameter role: a parameter of a module named
    *layernorm (local layers: input_layernorm, pre_mlp_layernorm, q/k_layernorm), or the
    layer_norm_weight/bias that Transformer Engine's fused LayerNorm-linears (linear_qkv, linear_fc1
    in megatron-core's TE spec) hold for the layer's norm."""
    module, _, param = name.rpartition(".")
    return param.startswith("layer_norm_") or module.rsplit(".", 1)[-1].endswith("layernorm")


def classify(name: str, layer_number) -> Tuple:
    """(layer, group) of a parameter name within a GPTModel chunk."""
    if layer_number is not None:
        if name.endswith("wesar_gate"):
            return layer_number, "gate"
        if is_norm_parameter(name):
            return layer_number, "ln"
        if ".self_attention." in name:
            return layer_number, "attention"
        if ".mlp." in name:
            return layer_number, "ffn"
        raise ValueError(f"cannot classify layer parameter {name}")
    if name.startswith("embedding."):
        return None, "embedding"
    if name.startswith("decoder.final_layernorm"):
        return None, "final_ln"
    if name.startswith("output_layer"):
        return None, "output_layer"
    raise ValueError(f"cannot classify parameter {name}")


def _layer_numbers(model) -> Dict[str, int]:
    """'decoder.layers.3.' prefix -> global 1-based layer number (PP/VP aware)."""
    return {f"{n}.": m.layer_number for n, m in model.named_modules()
            if hasattr(m, "layer_number") and n.startswith("decoder.layers.") and n.count(".") == 2}


def named_parameter_groups(chunks: Sequence[torch.nn.Module]):
    """Yields (key, name, param) for every parameter counted once across TP/PP/tied copies."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    seen = set()
    for chunk in chunks:
        model = unwrap(chunk)
        prefixes = _layer_numbers(model)
        for name, p in model.named_parameters():
            if id(p) in seen or not param_is_not_shared(p) or not param_is_not_tensor_parallel_duplicate(p):
                continue
            seen.add(id(p))
            layer = next((num for pre, num in prefixes.items() if name.startswith(pre)), None)
            yield classify(name, layer), name, p


def _owned_ranges(optimizer):
    """{model param: Range of its flattened elements whose reduced gradient this rank holds} for
    megatron-core's DistributedOptimizer(s); None for any other optimizer (every rank holds all)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    distributed = [o for o in parts if isinstance(o, DistributedOptimizer)]
    if not distributed:
        return None
    return {p: o._get_model_param_range_map(p)["param"] for o in distributed for p in o.model_param_gbuf_map}


def grad_stats_group(optimizer):
    """The group over which per-rank gradient sums add up to the whole (megatron-core's choice:
    the model-parallel group, or every rank of a distributed optimizer)."""
    from megatron.core import parallel_state

    if optimizer is not None and hasattr(optimizer, "get_grad_stats_parallel_group"):
        return optimizer.get_grad_stats_parallel_group()
    return parallel_state.get_model_parallel_group()


def owned_gradients(chunks, optimizer=None):
    """(key, name, grad) for each parameter counted once, `grad` being the part of its reduced
    gradient this rank holds: all of it, or its distributed-optimizer shard (absent: no part).
    An optimizer with an `owned_gradient(param)` method (the DeepSpeed engine's) answers itself."""
    if hasattr(optimizer, "owned_gradient"):
        for key, name, p in named_parameter_groups(chunks):
            grad = optimizer.owned_gradient(p)
            if grad is not None:
                yield key, name, grad
        return
    ranges = _owned_ranges(optimizer) if optimizer is not None else None
    for key, name, p in named_parameter_groups(chunks):
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        if grad is None:
            continue
        if ranges is not None:
            owned = ranges.get(p)
            if owned is None:
                continue
            grad = grad.view(-1)[owned.start:owned.end]
        yield key, name, grad


def squared_norms(chunks, num_layers: int, use_grads: bool = True, loss_scale: float = 1.0, optimizer=None):
    """{key: squared norm} of grads (main_grad, unscaled) or weights, complete on every rank.
    Pass the optimizer when it may be distributed (gradients are then read from its shards)."""
    from megatron.core import parallel_state

    keys = group_keys(num_layers)
    index = {k: i for i, k in enumerate(keys)}
    device = next(iter(unwrap(chunks[0]).parameters())).device
    totals = torch.zeros(len(keys), dtype=torch.float64, device=device)
    tensors = owned_gradients(chunks, optimizer) if use_grads else named_parameter_groups(chunks)
    for key, _, t in tensors:
        totals[index[key]] += t.detach().double().pow(2).sum()
    if use_grads and loss_scale != 1.0:
        totals /= loss_scale ** 2
    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        group = grad_stats_group(optimizer) if use_grads else parallel_state.get_model_parallel_group()
        torch.distributed.all_reduce(totals, group=group)
    return {k: totals[i].item() for i, k in enumerate(keys)}


def key_name(key: Tuple) -> str:
    layer, group = key
    return group if layer is None else f"layer{layer:02d}/{group}"
