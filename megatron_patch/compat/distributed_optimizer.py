"""Checkpoint fixes for megatron-core's optimizers (0.16.1 to 0.19.x), mostly its DistributedOptimizer
over torch's Adam/AdamW.

0. Any optimizer that has not stepped yet has no state, so its checkpoint lacks the moments a
   resumed run asks for, and that load fails. It happens whenever every step so far was skipped,
   e.g. by the fp16 loss scaler, whose initial 2^32 overflows for the first ~20 steps.
   -> `prime_state()` also covers this case (below). But megatron-core's regular optimizers
   save the shared step only `if step:`, so a primed step of 0 is dropped, and torch's Adam then
   refuses the state on load (KeyError 'step'). -> `load_state_dict()` restores a step of 0
   where the saved state has moments and no step.

Without apex or Transformer Engine (always on CPU, possibly on GPU) megatron-core runs the
distributed optimizer on `torch.optim.AdamW`, whose per-parameter state holds a `step` tensor.
Upstream (`optimizer/distrib_optimizer.py`) mishandles that `step` and the fp32 main params:
1. `state_dict()` asserts that all parameters share one `step` value, which fails (empty list)
   on a fresh optimizer; `sharded_state_dict(is_loading=True)` calls it first, so loading into a
   new run fails.  -> `prime_state()` allocates the state exactly as AdamW's first step would
   (step 0, zero moments) before any sharded_state_dict; no effect on the math.
1b. The fully reshardable formats leave `step` out of the per-parameter tensors they load, but
   `_set_main_param_and_optimizer_states` copies every state key: KeyError 'step'.
   -> during `load_state_dict()` each DistributedOptimizer instance gets a wrapper (removed
   afterwards) that supplies the parameter's current `step`, so that copy is a no-op; the real
   step is then set by fix 2.
2. **Silent:** `load_state_dict` restores `step` from the param groups as ONE tensor shared by
   every parameter, and the dp_reshardable parameter-state load then copies the stale local
   step (0 after priming) over it. AdamW would restart bias correction at step 0 and advance the
   shared counter once per parameter per step (30 instead of 2 after one step).
   -> `load_state_dict()` reads the saved step first and gives each parameter its own copy.
3. With fp32 parameters the main params are views of the model params (leaves that require
   grad); upstream copies into them outside `torch.no_grad()` and raises "a view of a leaf
   Variable ... in-place operation".  -> `load_state_dict()` runs under `torch.no_grad()`.
The functions leave other optimizers alone (megatron-core's regular optimizers restore `step`
with a per-parameter deepcopy; TE/apex Adam keep it in the param groups).

4. Any megatron-core optimizer: every parameter group carries the schedule values the
   OptimizerParamScheduler reads from it (`max_lr`, `min_lr`, `start_wd`, `end_wd`), and loading
   puts the saved groups in place of the current ones. Under 0.16.1 a resume with another --lr
   and --override-opt_param-scheduler therefore silently kept the checkpoint's lr; 0.19 matches
   saved groups to current ones by those values too (upstream.py) and refuses the resume with
   "Could not find parameter group with key ...". -> `load_state_dict()` first gives the saved
   groups the values the scheduler will use: this run's, or the checkpoint's under
   --use-checkpoint-opt_param-scheduler (then set on the current groups too, so they match).
   Without either flag a changed schedule is refused by the scheduler's own load, after this.
"""

import contextlib

import torch

from megatron_patch import upstream


def _chained_parts(optimizer, state_dict=None):
    """(megatron optimizer, its part of `state_dict`) for each optimizer of a ChainedOptimizer."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    if state_dict is None or len(chained) == 1:
        parts = [state_dict] * len(chained)
    elif isinstance(state_dict, dict):
        parts = [v for _, v in sorted(state_dict.items())]
    else:
        parts = list(state_dict)
    return list(zip(chained, parts))


def _torch_adams(optimizer, state_dict=None, distributed=True):
    """(megatron optimizer over torch Adam/AdamW, its part of `state_dict`) pairs: the
    DistributedOptimizers (distributed=True) or the others."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [(opt, part) for opt, part in _chained_parts(optimizer, state_dict)
            if isinstance(opt, DistributedOptimizer) == distributed
            and isinstance(getattr(opt, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))]


def _distributed_torch_adams(optimizer, state_dict=None):
    """(torch Adam/AdamW inside a DistributedOptimizer, its part of `state_dict`) pairs."""
    return [(opt.optimizer, part) for opt, part in _torch_adams(optimizer, state_dict)]


def _restore_zero_step(optimizer, state_dict) -> None:
    """Fault 0: a regular optimizer's saved state with moments but no shared step had step 0."""
    for _, part in _torch_adams(optimizer, state_dict, distributed=False):
        part = part or {}
        state = (part["optimizer"] if "optimizer" in part else part).get("state")  # mixed precision / fp32
        if state and "common_step" not in state and not any("step" in s for s in state.values()):
            state["common_step"] = torch.tensor(0.0, dtype=torch.float32)


def prime_state(optimizer) -> None:
    """Allocate missing optimizer state as the first step would (no effect on the math): torch's
    Adam/AdamW as torch does it (step 0, zero moments), other optimizers with megatron-core's own
    `init_state_fn` (zero moments; fused Adams keep the step in their param groups)."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            _prime_torch_adam(inner)
        elif inner is not None and getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, opt.config)


def _prime_torch_adam(adam) -> None:
    for group in adam.param_groups:
        for p in group["params"]:
            if adam.state.get(p):
                continue
            zeros = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
            state = {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": zeros(),
                     "exp_avg_sq": zeros()}
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = zeros()
            adam.state[p] = state


def _saved_step(part):
    try:
        steps = {g["step"] for g in part["optimizer"]["param_groups"] if g.get("step") is not None}
    except (KeyError, TypeError):
        return None
    return float(steps.pop()) if len(steps) == 1 else None


@contextlib.contextmanager
def _step_tolerant_state_setter(optimizer):
    """Fault 1b: let upstream's per-parameter state copy skip the `step` it was not given."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    patched = [opt for opt in chained if isinstance(opt, DistributedOptimizer)
               and isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW))]

    def wrap(opt):
        upstream = type(opt)._set_main_param_and_optimizer_states

        def set_states(model_param, tensors):
            group, order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group]["params"][order]
            step = opt.optimizer.state.get(main_param, {}).get("step")
            if "step" not in tensors and step is not None:
                tensors = dict(tensors, step=step)  # copied onto itself: unchanged
            return upstream(opt, model_param, tensors)
        return set_states

    for opt in patched:
        opt._set_main_param_and_optimizer_states = wrap(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _saved_param_groups(part):
    if not isinstance(part, dict):
        return None
    inner = part.get("optimizer", part.get("optimizer_state_dict", part))
    return inner.get("param_groups") if isinstance(inner, dict) else None


def _group_identity(group) -> tuple:
    """How upstream tells parameter groups apart, less the schedule values (fault 4)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    keys = [k for k in param_group_identifier_keys if k not in upstream.SCHEDULE_GROUP_KEYS]
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys)


def _align_schedule_values(optimizer, state_dict, keep_saved: bool) -> None:
    """Fault 4: saved and current parameter groups agree on the schedule values the scheduler will use."""
    for opt, part in _chained_parts(optimizer, state_dict):
        saved, inner = _saved_param_groups(part), getattr(opt, "optimizer", None)
        if not saved or inner is None:
            continue
        current = {}
        for group in inner.param_groups:
            current.setdefault(_group_identity(group), []).append(group)
        for group in saved:
            match = current.get(_group_identity(group), [])
            if len(match) != 1:  # none or ambiguous: leave it to upstream's own matching
                continue
            for key in upstream.SCHEDULE_GROUP_KEYS:
                if key in group and key in match[0]:
                    if keep_saved:
                        match[0][key] = group[key]
                    else:
                        group[key] = match[0][key]


def load_state_dict(optimizer, state_dict, keep_saved_schedule: bool = False) -> None:
    """`optimizer.load_state_dict(state_dict)` with faults 0, 1b, 2, 3 and 4 fixed (any megatron-core
    optimizer). `keep_saved_schedule`: --use-checkpoint-opt_param-scheduler (fault 4)."""
    _align_schedule_values(optimizer, state_dict, keep_saved_schedule)
    _restore_zero_step(optimizer, state_dict)
    steps = [(adam, _saved_step(part)) for adam, part in _distributed_torch_adams(optimizer, state_dict)]
    with torch.no_grad(), _step_tolerant_state_setter(optimizer):
        optimizer.load_state_dict(state_dict)
    for adam, step in steps:
        for state in adam.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                value = state["step"] if step is None else torch.tensor(step, dtype=state["step"].dtype)
                state["step"] = value.detach().clone()
