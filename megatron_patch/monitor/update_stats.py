"""The norm of Adam's update, read from the optimizer's own state right after its step.

Adam's update of a parameter is lr * m_hat / (sqrt(v_hat) + eps), with the bias-corrected
moments m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t) that the step just wrote (decoupled
weight decay, lr * wd * p, is not part of it: it is not what spikes). Reading it back from the
state needs no copy of the weights, so it can be measured every step; it is known only once the
step is done, so a spike in it cannot be skipped, only counted (toward --spike-policy rollback).

Works on megatron-core's optimizers over torch's Adam/AdamW and over the fused Adams of apex/TE
(step count in the param group); with the distributed optimizer each rank holds the state of its
shard, and the sum runs over the optimizer's grad-stats group, as the gradient norm's does.
Parameters replicated across TP ranks are counted on TP rank 0 only.
"""

import math

import torch

from .grad_stats import grad_stats_group


def _inner_optimizers(optimizer):
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield inner


def is_adam(optimizer) -> bool:
    """Does every inner optimizer keep Adam's moments (exp_avg / exp_avg_sq)?"""
    inners = list(_inner_optimizers(optimizer))
    return bool(inners) and all("betas" in group for inner in inners for group in inner.param_groups)


def step_lrs(optimizer) -> list:
    """The lr of every param group, to take before the step (the scheduler changes it after)."""
    return [[group["lr"] for group in inner.param_groups] for inner in _inner_optimizers(optimizer)]


def adam_update_norm(optimizer, lrs) -> float:
    """Global L2 norm of the Adam update the last step applied, at the lrs (`step_lrs`) it used
    (0.0 before any step)."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    total, device = None, None
    for inner, inner_lrs in zip(_inner_optimizers(optimizer), lrs):
        for group, lr in zip(inner.param_groups, inner_lrs):
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = inner.state.get(p) or {}
                if "exp_avg" not in state or not param_is_not_tensor_parallel_duplicate(p):
                    continue
                step = float(state.get("step", group.get("step", 0)))
                if step <= 0:
                    continue
                m_hat = state["exp_avg"].double() / (1 - beta1 ** step)
                v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** step)
                update = lr * m_hat / (v_hat.sqrt() + group["eps"])
                square = update.pow(2).sum()
                total = square if total is None else total + square
                device = p.device
    if total is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            torch.distributed.all_reduce(total, group=grad_stats_group(optimizer))
    return math.sqrt(total.item())
