"""--save/--load with --deepspeed: DeepSpeed's engine.save_checkpoint/load_checkpoint behind the
trainer's atomic protocol (training/checkpointing.py).

Layout: <save>/iter_0000100/ holds DeepSpeed's files (model states per TP rank, ZeRO optimizer
partitions per DP rank) and megatron_patch_deepspeed.json (iteration, consumed samples, layout,
ZeRO stage, vocabulary); <save>/latest_checkpointed_iteration.txt is the tracker. Every rank
writes into iter_0000100.tmp (DeepSpeed's tag); once all have finished, rank 0 renames it and
then replaces the tracker, exactly as the Megatron path does. DeepSpeed's own `latest` file is
not written, so nothing points at a checkpoint before it is complete; a crash mid-save leaves
the last good one and the tracker pointing at it. The lr scheduler and RNG states travel in
DeepSpeed's client state (the RNG of data-parallel rank 0 per TP rank: DP replicas share it).
"""

import json
import os

from megatron_patch.training import checkpointing as ckpt
from megatron_patch.training import load_failures, rng_state
from megatron_patch.training.errors import SetupError

FORMAT = "megatron_patch.deepspeed"
FORMAT_VERSION = 1
CLIENT_KEY = "megatron_patch"


def _metadata(ctx, state) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "iteration": state.iteration,
            "consumed_train_samples": state.consumed_train_samples,
            "consumed_valid_samples": state.consumed_valid_samples, "layout": ckpt._layout(),
            "zero_stage": ctx.args.zero_stage, "vocab_size": ctx.vocab_size,
            "padded_vocab_size": ctx.padded_vocab_size}


def save_checkpoint(ctx, state) -> str:
    """Write iteration `state.iteration` atomically; returns the final directory."""
    args, engine = ctx.args, ctx.model[0]
    final, tmp = ckpt.begin_save(args.save, state.iteration)
    client = {CLIENT_KEY: {"opt_param_scheduler": ctx.scheduler.state_dict(), "rng_state": rng_state.capture()}}
    engine.save_checkpoint(args.save, tag=os.path.basename(tmp), client_state=client, save_latest=False)
    if ckpt._rank0():
        path = os.path.join(tmp, ckpt.DEEPSPEED_METADATA)
        with open(path, "w") as f:
            json.dump(_metadata(ctx, state), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    ckpt.publish(args.save, state.iteration)
    return final


def read_checkpoint_header(args, vocab_size, padded_vocab_size):
    """(path, metadata) of the checkpoint --load resumes from, checked against this run; or None.
    Cheap (the tracker and one small JSON file): done before the model is built."""
    found = ckpt.find_checkpoint(args)
    if found is None:
        return None
    path, _ = found
    try:
        with open(os.path.join(path, ckpt.DEEPSPEED_METADATA)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise SetupError(f"{path} is not a DeepSpeed checkpoint of this trainer (saved without "
                         "--deepspeed?); resume it without --deepspeed") from None
    except (OSError, ValueError) as exc:
        raise SetupError(f"unreadable checkpoint metadata in {path}: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SetupError(f"{path} is not a DeepSpeed checkpoint written by this trainer")
    if (meta["vocab_size"], meta["padded_vocab_size"]) != (vocab_size, padded_vocab_size):
        raise SetupError(f"vocabulary mismatch: checkpoint {path} has vocab {meta['vocab_size']} (padded "
                         f"{meta['padded_vocab_size']}), this run {vocab_size} (padded {padded_vocab_size}); "
                         "use the same tokenizer and --make-vocab-size-divisible-by")
    here = {"tp": args.tensor_model_parallel_size, "pp": 1, "dp": args.data_parallel_size}
    if meta["layout"] != here or meta["zero_stage"] != args.zero_stage:
        raise SetupError(f"{path} was saved with ZeRO stage {meta['zero_stage']} at TP={meta['layout']['tp']} "
                         f"DP={meta['layout']['dp']}, this run is ZeRO stage {args.zero_stage} at "
                         f"TP={here['tp']} DP={here['dp']}; DeepSpeed checkpoints resume at the same "
                         "ZeRO stage and layout")
    return path, meta


def load_checkpoint(ctx, state, header) -> bool:
    """Restore model, optimizer, scheduler, RNG and data position from `header`'s checkpoint."""
    if header is None:
        return False
    path, meta = header
    engine = ctx.model[0]
    try:
        loaded, client = engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path),
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError("DeepSpeed found no checkpoint there")
        ctx.scheduler.load_state_dict(client[CLIENT_KEY]["opt_param_scheduler"])
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        if os.environ.get("MEGATRON_PATCH_DEBUG"):
            raise
        raise SetupError(f"cannot load checkpoint {path}: {type(exc).__name__}: "
                         f"{load_failures.first_line(exc)}") from None
    rng_notice = rng_state.restore(client[CLIENT_KEY]["rng_state"], ctx.args.seed, ctx.args.data_parallel_random_init)
    if rng_notice and ckpt._rank0():
        print(f" > {rng_notice}", flush=True)
    state.iteration = meta["iteration"]
    state.consumed_train_samples = meta["consumed_train_samples"]
    state.consumed_valid_samples = meta["consumed_valid_samples"]
    if ckpt._rank0():
        print(f" > loaded DeepSpeed checkpoint {path} (iteration {meta['iteration']}, ZeRO stage "
              f"{meta['zero_stage']})", flush=True)
    return True
