"""[WeSaR] weight scaling as reparameterization: W_bar = alpha * W with a trainable scalar alpha.

Each gated linear layer is a subclass of megatron-core's Column/RowParallelLinear that passes
alpha * W (computed on the fly, no persistent copy) to upstream's `_forward_impl`, so the
tensor-parallel communication, bias handling and sequence parallelism are upstream's own.

Tensor parallelism: alpha is one scalar replicated on every TP rank. dL/dalpha = sum(W * dL/dW_bar)
over the whole matrix, but each rank holds only its shard of W, so the per-rank sums must be added
over the TP group. `copy_to_tensor_model_parallel_region` (identity forward, all-reduce backward)
does that inside autograd, so the gradient is right wherever the model is used, with or without
megatron-core's DDP.

Which matrices: attention QKV and output projection, FFN fc1 and fc2 ([WeSaR] §3 gates every
weight matrix of the Transformer layers). The word/position embeddings and the output layer are
not gated: their scale is the subject of the [SNM] embedding options, and with tied embeddings the
output layer *is* the embedding table.
"""

import torch

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.utils import init_method_normal


class _WeSaRGate:
    """Mixin: adds `wesar_gate` (shape [1]: megatron-core's optimizer then skips weight decay on
    it, like every 1-D parameter) and feeds alpha * W to the matmul."""

    def __init__(self, *args, config, init_method, wesar_target_std: float, **kwargs):
        common_std = config.wesar_init_std
        # W ~ N(0, common_std^2) for every gated matrix, whatever the init scheme ([WeSaR] §3).
        super().__init__(*args, config=config, init_method=init_method_normal(common_std), **kwargs)
        dtype = config.params_dtype
        self.wesar_gate = torch.nn.Parameter(torch.full((1,), wesar_target_std / common_std, dtype=dtype))

    def _forward_impl(self, input, weight, *args, **kwargs):
        gate = copy_to_tensor_model_parallel_region(self.wesar_gate, group=self.tp_group)
        return super()._forward_impl(input, weight * gate, *args, **kwargs)

    @torch.no_grad()
    def fold_wesar_gate(self) -> None:
        """W <- alpha * W, alpha <- 1: the same function with plain weights (exact up to the one
        rounding of the product, which is also what the forward computes)."""
        self.weight.mul_(self.wesar_gate)
        self.wesar_gate.fill_(1.0)


class WeSaRColumnParallelLinear(_WeSaRGate, ColumnParallelLinear):
    """ColumnParallelLinear with W_bar = alpha * W."""


class WeSaRRowParallelLinear(_WeSaRGate, RowParallelLinear):
    """RowParallelLinear with W_bar = alpha * W."""


def wesar_layers(model: torch.nn.Module):
    """(name, module) of every gated linear layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _WeSaRGate)]


def fold_wesar_gates(model: torch.nn.Module) -> int:
    """Fold every alpha into its W in place; returns how many layers were folded."""
    layers = wesar_layers(model)
    for _, layer in layers:
        layer.fold_wesar_gate()
    return len(layers)


def plain_state_dict(model: torch.nn.Module) -> dict:
    """The model's state_dict with every W replaced by alpha * W and the gates dropped: loads into
    the same model built without WeSaR and gives the same outputs. The model is left unchanged."""
    state = model.state_dict()
    for name, layer in wesar_layers(model):
        prefix = f"{name}." if name else ""
        state[f"{prefix}weight"] = (layer.weight * layer.wesar_gate).detach()
        del state[f"{prefix}wesar_gate"]
    return state
