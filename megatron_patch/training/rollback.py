"""Roll back to the last checkpoint when the stability monitor asks (--spike-policy rollback).

Reloads model, optimizer, scheduler and RNG from the newest checkpoint under --save. The data
position goes back with it, unless the request says `skip_data`: then training continues with
the samples that follow the ones that spiked (the same batches are not fed again). An lr
cool-down (`lr_factor` for `lr_steps` steps) can be asked for too.
"""

import argparse
import os

from . import checkpointing, data, optimizer
from .errors import SetupError


def ensure_rollback_point(ctx, state, save_fn) -> None:
    """Save the starting point when --save holds no checkpoint yet, so that a rollback requested
    before the first --save-interval checkpoint has somewhere to go (spikes come early: Vanilla's
    bursts right after warm-up)."""
    args = ctx.args
    if os.path.isfile(os.path.join(args.save, checkpointing.TRACKER)):
        return
    save_fn(state)
    ctx.logger.print(f" > rollback point: iteration {state.iteration} saved to {args.save} "
                     "(--spike-policy rollback, before the first --save-interval checkpoint)")


def make_rollback_fn(ctx, datasets, ckpt=checkpointing):
    """The rollback_fn the loop calls: (state, request) -> fresh train iterators. `ckpt`: the
    checkpoint module of the engine (training.checkpointing, or megatron_patch.deepspeed.checkpoint)."""
    args = ctx.args

    def rollback(state, request):
        resume_args = argparse.Namespace(**{**vars(args), "load": args.save, "ckpt_step": None})
        header = ckpt.read_checkpoint_header(resume_args, ctx.vocab_size, ctx.padded_vocab_size)
        if header is None:  # ensure_rollback_point wrote one: only a deleted directory gets here
            raise SetupError(f"rollback requested after iteration {state.iteration}, but {args.save} "
                             "holds no checkpoint any more")
        spiked_iteration, consumed = state.iteration, state.consumed_train_samples
        # megatron-core's scheduler.load_state_dict *adds* the saved step count to its own: it
        # expects a fresh scheduler, so give it one.
        ctx.scheduler = optimizer.build_scheduler(args, ctx.optimizer)
        ckpt.load_checkpoint(ctx, state, header)
        if request.get("skip_data"):
            state.consumed_train_samples = consumed
        ctx.lr_scale = (request.get("lr_factor", 1.0), state.iteration + 1 + request.get("lr_steps", 0))
        if ctx.lr_scale[0] != 1.0:
            from .loop import apply_lr_scale

            apply_lr_scale(ctx, state.iteration + 1)
        ctx.rollbacks.append((spiked_iteration, state.iteration))
        ctx.logger.print(f" > rollback after iteration {spiked_iteration} to the checkpoint of iteration "
                         f"{state.iteration}" + (" (skipping the data in between)" if request.get("skip_data") else ""))
        for it in ctx.train_iterators or []:
            it.close()
        ctx.train_iterators = [data.make_iterator(args, datasets[0], state.consumed_train_samples, ctx.runtime.device)
                               for _ in ctx.model]
        return ctx.train_iterators

    return rollback
