"""torchrun worker for the stability-monitor tests. Usage: monitor_worker.py CASE OUT_JSON ARGS...

Injects faults with a callback that runs before the monitor (after the gradient all-reduce):
  grad    multiply every gradient by 1e3 at --inject steps (a grad-norm spike on every rank)
  nan     put a NaN into one gradient on rank 1 only at --inject steps
It records, per step, whether the weights changed, and writes what rank 0 saw to OUT_JSON.
"""

import json
import sys

import torch


class FaultInjector:
    def __init__(self, case, steps):
        self.case, self.steps = case, set(steps)
        self.changed = {}  # iteration -> did the weights change in this step
        self._before = None

    def _params(self, state):
        return [p for chunk in state.model for p in chunk.parameters()]

    def on_before_optimizer_step(self, state):
        self._before = [p.detach().clone() for p in self._params(state)]
        if state.iteration not in self.steps:
            return None
        self.steps.discard(state.iteration)  # once: a rollback replays these iterations
        grads = [p.main_grad for p in self._params(state)]
        if self.case == "grad":
            for g in grads:
                g.mul_(1e3)
        elif self.case == "nan" and torch.distributed.get_rank() == 1:
            grads[0].view(-1)[0] = float("nan")
        return None

    def on_step_end(self, state):
        after = self._params(state)
        self.changed[state.iteration] = any(not torch.equal(a, b) for a, b in zip(after, self._before))

    def on_train_end(self, state):  # the process group is still up here
        self.changed_per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(self.changed_per_rank, self.changed)


def main():
    case, out, *argv = sys.argv[1:]
    inject = [int(s) for s in argv[argv.index("--inject") + 1].split(",") if s]
    argv = argv[:argv.index("--inject")] + argv[argv.index("--inject") + 2:]
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
