"""torchrun worker for test_deepspeed.py: several training runs in one launch (start-up is the slow part).

    torchrun --nproc-per-node 2 deepspeed_worker.py SPEC.json OUT_DIR

SPEC.json: [{"name": ..., "argv": [...], optional "crash_on_save": ITERATION, "veto_callback": true}].
Each run writes OUT_DIR/<name>.rank<R>.json: {"history": [...], "eval": [validation losses],
"param_groups": [[wd_mult, weight_decay, lr], ...]}, or {"error": message} for a SetupError, or
{"crashed": message} when the injected crash fired: DeepSpeed's save_checkpoint raises right after
writing every file of that iteration, before the trainer publishes it (what a kill at that moment
leaves behind). "veto_callback" adds a callback with on_before_optimizer_step.
"""

import contextlib
import json
import sys
import warnings

warnings.filterwarnings("ignore")

from megatron_patch.training.callbacks import Callback  # noqa: E402
from megatron_patch.training.errors import SetupError  # noqa: E402
from megatron_patch.training.pretrain import run  # noqa: E402


class InjectedCrash(RuntimeError):
    pass


class Veto(Callback):
    def on_before_optimizer_step(self, state):
        return False


class EvalRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_eval_end(self, state, metrics):
        self.losses.append(metrics["lm loss"])


@contextlib.contextmanager
def crash_after_writing(iteration):
    from megatron_patch.deepspeed.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.save_checkpoint

    def save_then_crash(self, save_dir, tag=None, **kwargs):
        result = original(self, save_dir, tag=tag, **kwargs)
        if tag == f"iter_{iteration:07d}.tmp":
            raise InjectedCrash(f"killed after writing {tag}")
        return result

    DeepSpeedEngine.save_checkpoint = save_then_crash
    try:
        yield
    finally:
        DeepSpeedEngine.save_checkpoint = original


def one_run(item) -> dict:
    crash, evals = item.get("crash_on_save"), EvalRecorder()
    try:
        with crash_after_writing(crash) if crash else contextlib.nullcontext():
            ctx = run(item["argv"], callbacks=[evals] + ([Veto()] if item.get("veto_callback") else []))
    except SetupError as exc:
        return {"error": str(exc)}
    except InjectedCrash as exc:
        return {"crashed": str(exc)}
    groups = [[g["wd_mult"], g["weight_decay"], g["lr"]] for g in ctx.optimizer.param_groups]
    return {"history": ctx.history, "eval": evals.losses, "param_groups": groups}


if __name__ == "__main__":
    import torch

    spec, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    for item in spec:
        result = one_run(item)
        rank = torch.distributed.get_rank()
        with open(f"{out}/{item['name']}.rank{rank}.json", "w") as f:
            json.dump(result, f)
        torch.distributed.barrier()
