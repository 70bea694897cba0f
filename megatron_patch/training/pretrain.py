"""parse -> build -> train: what pretrain_gpt.py runs. `run()` raises SetupError, `main()` prints it."""

import sys

from megatron_patch import interrupts
from megatron_patch.interrupts import INTERRUPTED

from .arguments import parse_and_validate
from .callbacks import CallbackList
from .errors import SetupError, TrainingDiverged
from .peers import PeerLost


def _checkpoints(args):
    """Checkpoint read/write: megatron-core dist_checkpointing, or DeepSpeed's engine."""
    if args.deepspeed:
        from megatron_patch.deepspeed import checkpoint

        return checkpoint
    from . import checkpointing

    return checkpointing


def build(args, callbacks=None):
    """Process groups, tokenizer, data, model, optimizer, checkpoint: a ready TrainContext."""
    from . import data, initialize, model_builder, optimizer, peers, shared_storage
    from .logging import TrainingLogger
    from .loop import TrainContext, TrainState, wire_schedule_config

    ckpt = _checkpoints(args)
    runtime = initialize.initialize_distributed(args)
    shared_storage.prove_same_directories(args)  # a per-node --save would lose the run silently
    peers.start_heartbeat()  # so that a node lost mid-run is named, not just timed out
    tokenizer = data.build_tokenizer(args)
    args.tokenizer_identity = data.tokenizer_identity(args, tokenizer)  # saved in checkpoints, for evaluate/export
    if not args.mock_data:
        data.check_vocabulary(args, tokenizer)
    padded = model_builder.padded_vocab_size(tokenizer.vocab_size, args)
    header = ckpt.read_checkpoint_header(args, tokenizer.vocab_size, padded) if args.load else None
    if header is not None:  # a resume keeps the checkpoint's padding (checked: this TP size divides it)
        padded = header[1]["padded_vocab_size"]
    datasets = data.build_datasets(args, tokenizer)
    config = args.transformer_config
    if args.deepspeed:  # DeepSpeed's engine instead of megatron-core's DDP and optimizer
        from megatron_patch.deepspeed.engine import build_engine

        model, opt, scheduler = build_engine(args, config, padded, runtime.device)
    else:
        model = model_builder.build_model_chunks(args, config, padded, runtime.device)
        opt = optimizer.build_optimizer(args, model)
        scheduler = optimizer.build_scheduler(args, opt)
    ctx = TrainContext(args=args, model=model, optimizer=opt, scheduler=scheduler,
                       config=config, runtime=runtime, vocab_size=tokenizer.vocab_size,
                       padded_vocab_size=padded, callbacks=CallbackList(callbacks))
    if not args.deepspeed:
        wire_schedule_config(ctx)
    state = TrainState()
    ctx.resumed = ckpt.load_checkpoint(ctx, state, header)
    ctx.logger = TrainingLogger(args, padded, runtime.world_size)
    for callback in ctx.callbacks.callbacks:
        if hasattr(callback, "attach_logger"):
            callback.attach_logger(ctx.logger)
    ctx.datasets = datasets
    if runtime.rank == 0:
        print(f" > {runtime.device.type} x {runtime.world_size} ({runtime.backend}):"
              f" TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size}"
              f" DP={args.data_parallel_size}; vocab {tokenizer.vocab_size}"
              f" padded to {padded}; {model_builder.count_parameters(model):,} parameters on rank 0;"
              f" starting at iteration {state.iteration}", flush=True)
    iters = {name: [data.make_iterator(args, ds, consumed, runtime.device) for _ in model]
             for name, ds, consumed in zip(("train", "valid", "test"), datasets,
                                           (state.consumed_train_samples, state.consumed_valid_samples, 0))}
    iters = {k: (v if v[0] is not None else None) for k, v in iters.items()}
    ctx.train_iterators = iters["train"]
    return ctx, state, iters


def callbacks_from_args(args) -> list:
    """Callbacks the command line asks for: the stability monitor (--monitor-interval / --spike-policy)."""
    from megatron_patch.monitor.callback import StabilityMonitor, monitor_enabled

    return [StabilityMonitor(args)] if monitor_enabled(args) else []


def run(argv=None, callbacks=None):
    """Train as pretrain_gpt.py would; returns the TrainContext (losses in ctx.history).
    `callbacks` (see callbacks.py) are called before those the flags ask for (the stability
    monitor), so a test can inject a fault that the monitor must then catch."""
    from . import child_processes, initialize, peers, save_dir
    from .loop import train
    from .rollback import ensure_rollback_point, make_rollback_fn

    args = parse_and_validate(argv)
    child_processes.die_with_parent()  # forked checkpoint writers and loaders must not outlive us
    callbacks = list(callbacks or []) + callbacks_from_args(args)
    handler, iters, ctx, keep_beating = None, {}, None, False
    lock = save_dir.prepare(args) if interrupts.is_rank0() else None  # before any heavy work
    if lock is not None and lock.notice:
        print(f" > {args.save}: {lock.notice}", flush=True)
    try:
        # Installed first: a SIGTERM during set-up then stops the run after its first step.
        handler = interrupts.ExitSignalHandler() if args.exit_signal_handler else None
        ctx, state, iters = build(args, callbacks)
        if iters["train"] is None and not args.skip_train and args.train_iters > 0:
            raise SetupError("the training split is empty")
        engine_steps = {}
        if args.deepspeed:  # the engine's train/eval steps
            from megatron_patch.deepspeed.engine import loop_functions

            engine_steps = loop_functions(ctx)

        def save_fn(st):
            return _checkpoints(args).save_checkpoint(ctx, st)

        rollback_fn = None
        if args.spike_policy == "rollback":
            ensure_rollback_point(ctx, state, save_fn)
            rollback_fn = make_rollback_fn(ctx, ctx.datasets, _checkpoints(args))
        ctx.stop_reason = train(ctx, state, iters["train"], iters["valid"], iters["test"], save_fn=save_fn,
                                signal_handler=handler, rollback_fn=rollback_fn, **engine_steps)
        ctx.state = state
        ctx.logger.close()
        return ctx
    except (SetupError, TrainingDiverged):
        raise
    except Exception as exc:
        lost = peers.explain_lost(exc, args.distributed_timeout_minutes)
        if lost is None:
            raise
        keep_beating = True  # ranks still diagnosing watch this one's heartbeat; it ends with the process
        raise PeerLost(lost) from None
    finally:
        if handler is not None:
            handler.restore()
        if not keep_beating:
            peers.stop_heartbeat()
        # Closing twice is harmless; a rollback may have replaced the train iterators.
        for its in list(iters.values()) + [getattr(ctx, "train_iterators", None)]:
            for it in its or []:
                it.close()
        initialize.teardown()
        if lock is not None:
            lock.__exit__()


def main(argv=None, callbacks=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--dry-run" in argv:  # plans for the GPU cluster (flags validated as on CUDA); builds nothing
        from .dry_run import main as dry_run_main

        return dry_run_main(argv)
    try:
        run(argv, callbacks)
    except (SetupError, TrainingDiverged) as exc:
        if interrupts.is_rank0():
            print(f"pretrain_gpt.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C without --exit-signal-handler (a save under way removed its .tmp)
        if interrupts.is_rank0():
            print("pretrain_gpt.py: interrupted (Ctrl-C): stopped without saving; --load resumes from the last "
                  "checkpoint, and --exit-signal-handler makes Ctrl-C save one first", file=sys.stderr, flush=True)
        return INTERRUPTED
    except PeerLost as exc:  # printed by every rank: each names the peer it lost
        print(f"pretrain_gpt.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
