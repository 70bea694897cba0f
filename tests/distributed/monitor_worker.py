"""torchrun worker for the stability-monitor tests.

    monitor_worker.py CASE OUT_JSON ARGS... --inject STEPS       one run
    monitor_worker.py --spec SPEC.json                            several runs in one launch
                      (SPEC.json: [{"case", "out", "argv", "inject"}, ...])

Injects faults with a callback that runs before the monitor (after the gradient all-reduce):
  grad    multiply every gradient by 1e3 at --inject steps (a grad-norm spike on every rank)
  nan     put a NaN into one gradient on rank 1 only at --inject steps
  loss    multiply the model's per-token losses by 1e3 in the forward of the --inject steps (a loss
          and gradient spike on every rank, whatever engine holds the gradients)
It records, per step, whether the weights changed (the optimizer's own parameters, which under
DeepSpeed's ZeRO are this rank's fp32 partitions), and writes what rank 0 saw to OUT_JSON.
"""

import json
import sys

import torch
from megatron_patch.training.callbacks import Callback


class FaultInjector(Callback):
    def __init__(self, case, steps):
        self.case, self.steps = case, set(steps)
        self.changed = {}  # iteration -> did the weights change in this step
        self._before = self._hook = None

    def _params(self, state):
        if hasattr(state.optimizer, "owned_gradient"):  # DeepSpeed: the engine's fp32 partitions
            zero3 = getattr(state.optimizer.engine.optimizer, "fp32_partitioned_groups_flat", None)
            if zero3 is not None:  # ZeRO-3 hands them to Adam's param groups only inside its step
                return list(zero3)
            return [p for group in state.optimizer.optimizer.param_groups for p in group["params"]]
        return [p for chunk in state.model for p in chunk.parameters()]

    def on_step_start(self, state):
        from megatron_patch.monitor.grad_stats import unwrap

        if self.case == "loss" and state.iteration in self.steps:
            self._hook = unwrap(state.model[0]).register_forward_hook(lambda module, args, out: out * 1e3)

    def on_before_optimizer_step(self, state):
        self._before = [p.detach().clone() for p in self._params(state)]
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if state.iteration not in self.steps:
            return None
        self.steps.discard(state.iteration)  # once: a rollback replays these iterations
        if self.case == "grad":
            for p in self._params(state):
                p.main_grad.mul_(1e3)
        elif self.case == "nan" and torch.distributed.get_rank() == 1:
            self._params(state)[0].main_grad.view(-1)[0] = float("nan")
        return None

    def on_step_end(self, state):
        after = self._params(state)
        self.changed[state.iteration] = any(not torch.equal(a, b) for a, b in zip(after, self._before))

    def on_train_end(self, state):  # the process group is still up here
        self.changed_per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(self.changed_per_rank, self.changed)


def main():
    if sys.argv[1] == "--spec":
        for item in json.loads(open(sys.argv[2]).read()):
            run_case(item["case"], item["out"], item["argv"], item["inject"])
            torch.distributed.barrier()
        return
    case, out, *argv = sys.argv[1:]
    inject = [int(s) for s in argv[argv.index("--inject") + 1].split(",") if s]
    run_case(case, out, argv[:argv.index("--inject")] + argv[argv.index("--inject") + 2:], inject)


def run_case(case, out, argv, inject):
    from megatron_patch.training.pretrain import run

    injector = FaultInjector(case, inject)
    ctx = run(argv, callbacks=[injector])
    monitor = ctx.callbacks.callbacks[-1]
    result = {"spikes": sorted({e.iteration for e in monitor.spike_log}),
              "changed": injector.changed, "history": ctx.history,
              "rollbacks": getattr(ctx, "rollbacks", []), "iteration": ctx.state.iteration}
    result["changed_per_rank"] = injector.changed_per_rank  # every rank must agree
    if ctx.runtime.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
