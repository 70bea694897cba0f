"""Checkpointing fixes for megatron-core 0.16.1's DistributedOptimizer over torch's Adam/AdamW.

Without apex or Transformer Engine (always on CPU, possibly on GPU), megatron-core runs the
distributed optimizer on `torch.optim.AdamW`, whose per-parameter state holds a `step` tensor.
Upstream's handling of that `step` has three faults (`optimizer/distrib_optimizer.py`):
1. `state_dict()` asserts that all parameters share one `step` value, which fails (empty list)
   on a fresh optimizer; `sharded_state_dict(is_loading=True)` calls it first, so loading into
   a new run always fails.  -> `prime_state()` allocates the state exactly as AdamW's first step
   would (step 0, zero moments), before any sharded_state_dict.
2. (the KeyError 'step' on load is a consequence of 1: no state to attach it to.)
3. **Silent:** `load_state_dict` gives one shared `step` tensor to every parameter; AdamW then
   increments it once per parameter per step, so bias correction is wrong after a resume (the
   step reads 30 instead of 2 after one step with 28 parameters).  -> `untie_steps()` gives each
   parameter its own copy after loading.
Both functions do nothing for other optimizers (regular megatron-core optimizers restore the
step with a deepcopy per parameter; TE/apex Adam keeps it in the param groups).
"""

import torch


def _inner_torch_adams(optimizer):
    """torch Adam/AdamW instances inside megatron-core DistributedOptimizer(s) of `optimizer`."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [opt.optimizer for opt in chained
            if isinstance(opt, DistributedOptimizer)
            and isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW))]


def prime_state(optimizer) -> None:
    """Allocate missing Adam state as torch would on the first step (no effect on the math)."""
    for adam in _inner_torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if adam.state.get(p):
                    continue
                state = {"step": torch.tensor(0.0, dtype=torch.float32),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                adam.state[p] = state


def untie_steps(optimizer) -> None:
    """Give every parameter its own `step` tensor (upstream shares one after load)."""
    for adam in _inner_torch_adams(optimizer):
        for state in adam.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()
