"""Per-step hooks of the training loop (e.g. a stability monitor that may veto an update).

A callback subclasses `Callback` and overrides the hooks it needs (the others do nothing):

    on_train_start(state)                  once, after the checkpoint (if any) is loaded
    on_step_start(state)                   before the forward/backward of iteration state.iteration
    on_before_optimizer_step(state) -> bool | None
                                           after forward/backward and the gradient all-reduce,
                                           before the optimizer step; return True to skip this
                                           update (counted as skipped; like an fp16 overflow in
                                           Megatron-LM the LR schedule does not advance, the
                                           data position does)
    on_step_end(state)                     after the step; state.grad_norm/skipped are set; a
                                           callback may set state.extra["rollback"] = {skip_data,
                                           lr_factor, lr_steps} to ask the trainer to reload the
                                           last checkpoint (see megatron_patch/training/rollback.py)
    on_eval_end(state, metrics)            after validation, metrics = {"lm loss": .., "ppl": ..}
    on_train_end(state)                    once, after the final checkpoint

Every rank calls every hook with the same values (the loss is broadcast from the last pipeline
stage; skip votes are combined with a max over all ranks, so one "skip" skips everywhere).
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch


class Callback:
    """The training loop's hooks, each a no-op here (see the module docstring for when each runs)."""

    def on_train_start(self, state: "StepState") -> None:
        pass

    def on_step_start(self, state: "StepState") -> None:
        pass

    def on_before_optimizer_step(self, state: "StepState") -> Optional[bool]:
        return None

    def on_step_end(self, state: "StepState") -> None:
        pass

    def on_eval_end(self, state: "StepState", metrics: dict) -> None:
        pass

    def on_train_end(self, state: "StepState") -> None:
        pass


@dataclass
class StepState:
    """What a callback sees. `model` is the list of DDP chunks, `optimizer` megatron-core's."""

    iteration: int
    model: List[Any]
    optimizer: Any
    args: Any
    loss: Optional[float] = None
    grad_norm: Optional[float] = None
    learning_rate: Optional[float] = None
    skipped: bool = False
    extra: dict = field(default_factory=dict)

    def current_grad_norm(self) -> float:
        """Global L2 norm of this step's (all-reduced) gradients, before clipping.

        Usable in on_before_optimizer_step; reads the DDP main_grad buffers, the same gradients
        the optimizer will clip. With the distributed optimizer each rank reads only the shard
        its reduce-scatter completed, and the sum runs over every rank of the optimizer
        (megatron-core's own grad-stats group); see megatron_patch.monitor.grad_stats.
        """
        from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

        from megatron_patch.monitor.grad_stats import grad_stats_group, owned_gradients

        grads = [g for _, _, g in owned_gradients(self.model, self.optimizer)]
        return float(get_grad_norm_fp32(grads, grad_stats_parallel_group=grad_stats_group(self.optimizer)))


class CallbackList:
    """Calls each hook on every callback in order."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"{type(cb).__name__} is not a megatron_patch.training.callbacks.Callback")

    def __bool__(self):
        return bool(self.callbacks)

    def _call(self, hook, *a):
        return [getattr(cb, hook)(*a) for cb in self.callbacks]

    def on_train_start(self, state):
        self._call("on_train_start", state)

    def on_step_start(self, state):
        self._call("on_step_start", state)

    def on_before_optimizer_step(self, state) -> bool:
        """True if any callback on any rank asks to skip the update."""
        vote = any(bool(v) for v in self._call("on_before_optimizer_step", state))
        flag = torch.tensor([1.0 if vote else 0.0])
        if torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            flag = flag.cuda() if backend == "nccl" else flag
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def on_step_end(self, state):
        self._call("on_step_end", state)

    def on_eval_end(self, state, metrics):
        self._call("on_eval_end", state, metrics)

    def on_train_end(self, state):
        self._call("on_train_end", state)
