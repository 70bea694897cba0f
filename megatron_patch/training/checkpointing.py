"""Checkpoints with megatron-core dist_checkpointing: resharding across TP/PP, atomic, resumable.

Layout (Megatron-LM's): <save>/iter_0000100/ (a torch_dist checkpoint) and
<save>/latest_checkpointed_iteration.txt. A checkpoint is written to iter_0000100.tmp first;
only when every rank has finished does rank 0 rename it and then replace the tracker file
(write + fsync + os.replace). A crash at any point leaves the last good checkpoint and the
tracker pointing at it; a save that fails or is interrupted removes its *.tmp (naming a full
disk), and one left by a hard kill is removed by the next save.

Contents: model chunks ("model0", ...), optimizer (parameter state sharded by model tensor, so it
reshards), LR scheduler, RNG states (per TP/PP rank, with the device type they came from),
iteration, consumed train/valid samples, the layout/vocabulary it was made with (checked on
load) and the MLP activation computed (exact or tanh GELU, for evaluation and export).
Checkpoints of Transformer Engine and of local layers load into each other (checkpoint_keys.py).
"""

import contextlib
import errno
import os
import shutil

import torch

from megatron_patch import upstream

from . import checkpoint_keys, load_failures, optimizer, rng_state, shared_storage
from .checkpoint_names import TRACKER
from .errors import SetupError
from .model_builder import activation_name, model_flag_differences, padded_vocab_size_on_resume, unwrap

FORMAT_VERSION = 1
DEEPSPEED_METADATA = "megatron_patch_deepspeed.json"  # marks a --deepspeed checkpoint directory


def add_checkpointing_args(parser):
    g = parser.add_argument_group("checkpointing", "torch_dist checkpoints (reshardable across TP/PP).")
    g.add_argument("--save", default=None, help="Directory to write checkpoints to.")
    g.add_argument("--save-interval", type=int, default=None, help="Iterations between checkpoints.")
    g.add_argument("--load", default=None, help="Directory to resume from (its latest checkpoint).")
    g.add_argument("--ckpt-step", type=int, default=None, help="Load this iteration, not the latest.")
    g.add_argument("--no-save-optim", action="store_true", help="Save the model without the optimizer state.")
    g.add_argument("--no-save-rng", action="store_true", help="Save without the RNG states.")
    g.add_argument("--no-load-optim", action="store_true", help="Load the model only; fresh optimizer state.")
    g.add_argument("--no-load-rng", action="store_true", help="Do not restore the RNG states.")
    g.add_argument("--finetune", action="store_true",
                   help="Load model weights only; restart at iteration 0 with fresh optimizer/RNG.")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="Fail if --load has no checkpoint (default: start from scratch).")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist",
                   help="Checkpoint format (torch_dist: megatron-core distributed checkpointing).")
    g.add_argument("--use-dist-ckpt", action="store_true", help="Accepted; always on.")
    g.add_argument("--auto-detect-ckpt-format", action="store_true", help="Accepted; always on.")
    g.add_argument("--dist-ckpt-format", choices=["torch_dist"], default="torch_dist", help="Alias of --ckpt-format.")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="Distributed optimizer: save its state resharable across TP/PP too "
                        "(gathered on DP rank 0); default dp_reshardable (DP changes only).")
    g.add_argument("--no-ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_false",
                   help="Write each replicated tensor from one rank only, instead of spreading the "
                        "writes over the data-parallel ranks (Megatron-LM's default: spread).")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="Read each tensor once, spread over the data-parallel ranks, and exchange "
                        "the pieces (less storage traffic on large DP).")
    g.add_argument("--overwrite-checkpoints", action="store_true",
                   help="Let a fresh run (one not resuming from --save) write into a --save that already "
                        "holds a run, replacing its checkpoints (refused without this flag).")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="On SIGTERM (e.g. Slurm preemption) or SIGINT (Ctrl-C): save a checkpoint and exit "
                        "cleanly after the current step; a second Ctrl-C stops at once without saving.")
    return parser


def validate_checkpointing_args(args) -> None:
    if args.save_interval is not None and args.save_interval <= 0:
        raise SetupError("--save-interval must be > 0")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise SetupError(f"--save {args.save} is a file; give a directory")
    args.checkpoint_notes = []
    if args.exit_signal_handler and not args.save:
        args.checkpoint_notes.append("--exit-signal-handler without --save: on SIGTERM or SIGINT the run "
                                     "stops without saving anything")
    if args.load and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise SetupError(f"--load {args.load} is not a directory")
    if args.load and not os.path.exists(args.load):  # a typo would silently start from iteration 0
        if not args.save or os.path.abspath(args.save) != os.path.abspath(args.load):
            raise SetupError(f"--load {args.load}: no such directory; check the path (a fresh run needs no --load; "
                             "a job that resumes where it saves gives --load and --save the same directory)")
        args.checkpoint_notes.append(f"--load {args.load} does not exist yet (it is also --save): starting from "
                                     "scratch")
    if args.finetune:
        args.no_load_optim = args.no_load_rng = True


def _iter_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _layout():
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _sharded_state_dict(ctx, with_optimizer, with_rng, is_loading, metadata):
    from megatron_patch.compat import distributed_optimizer as dopt_fix

    sd = {f"model{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(ctx.model)}
    if with_optimizer:
        dopt_fix.prime_state(ctx.optimizer)  # an unstepped optimizer has no state to save or load
        sd["optimizer"] = ctx.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=metadata)
        sd["opt_param_scheduler"] = ctx.scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = rng_state.sharded(ctx.args.data_parallel_random_init)
    return sd


def _optimizer_metadata(args):
    """How optimizer state is laid out in the checkpoint (stored in it as content metadata)."""
    sharding = "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
    return {"distrib_optim_sharding_type": sharding if args.use_distributed_optimizer else None,
            "chained_optim_avoid_prefix": True, "singleton_local_shards": False}


def save_checkpoint(ctx, state) -> str:
    """Write iteration `state.iteration` atomically; returns the final directory."""
    from megatron.core import dist_checkpointing

    from megatron_patch.compat.dist_checkpointing import use_in_process_results_queue

    use_in_process_results_queue()  # synchronous save: no spawn-manager process
    args = ctx.args
    final, tmp = begin_save(args.save, state.iteration)
    metadata = _optimizer_metadata(args)
    sd = _sharded_state_dict(ctx, not args.no_save_optim, not args.no_save_rng, False, metadata)
    sd.update(
        format_version=FORMAT_VERSION, iteration=state.iteration,
        consumed_train_samples=state.consumed_train_samples,
        consumed_valid_samples=state.consumed_valid_samples,
        layout=_layout(), vocab_size=ctx.vocab_size, padded_vocab_size=ctx.padded_vocab_size,
        activation=activation_name(_config_of(ctx)),
        use_distributed_optimizer=args.use_distributed_optimizer,
        megatron_core_version=str(upstream.VERSION),
        tokenizer_identity=getattr(args, "tokenizer_identity", None),  # checked by evaluate.py and the export
        spike_detector=next((d.state_dict() for d in _spike_detectors(ctx)), None),
        has_optimizer=not args.no_save_optim, has_rng=not args.no_save_rng,
        args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    )
    with abandoned_on_failure(args.save, tmp):
        dist_checkpointing.save(sd, tmp, sharded_strategy=_save_strategy(args), content_metadata=metadata)
        publish(args.save, state.iteration)
    return final


def _spike_detectors(ctx):
    """The stability monitor's spike detectors: their windows travel with the checkpoint, so a
    resumed run is not blind for --spike-min-history steps (OLMo-core checkpoints its monitor)."""
    callbacks = getattr(getattr(ctx, "callbacks", None), "callbacks", None) or []
    return [cb.detector for cb in callbacks if hasattr(cb, "detector")]


def _config_of(ctx):
    return getattr(ctx, "config", None) or unwrap(ctx.model[0]).config


def _save_strategy(args):
    """torch_dist writer; with DP > 1 wrapped so that the DP replicas share the writing of
    replicated tensors (Megatron-LM's default, --no-ckpt-fully-parallel-save turns it off)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy("torch_dist")
    if getattr(args, "ckpt_fully_parallel_save", False) and ps.get_data_parallel_world_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
    return strategy


def _load_strategy(args, path):
    """torch_dist reader; with --ckpt-fully-parallel-load each DP replica reads a part and the
    ranks exchange them."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(path)
    if getattr(args, "ckpt_fully_parallel_load", False) and ps.get_data_parallel_world_size() > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
    return strategy


def begin_save(root, iteration):
    """(final, tmp) directories of iteration's checkpoint; tmp is created empty on rank 0."""
    final = _iter_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank0():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash
        os.makedirs(tmp)
    _barrier()
    return final, tmp


MIN_FREE_BYTES = 64 << 20  # a failed save with less free than this on --save's filesystem: the disk is full


@contextlib.contextmanager
def abandoned_on_failure(root, tmp):
    """A save that fails or is interrupted leaves nothing half-written: rank 0 removes `tmp` (the
    tracker still names the last good checkpoint). A full disk is named in one line: torch's
    writers report it as 'unexpected pos 704 vs 598', so the free space is measured first,
    before the partial files are removed."""
    try:
        yield
    except BaseException as exc:
        # megatron-core 0.19's writer reports a failed write as torch's CheckpointException, a
        # BaseException (upstream.load_errors); an interrupt is not a disk problem.
        full = isinstance(exc, upstream.load_errors()) and _disk_full(root, exc)
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            last = _tracked_iteration(root)
            raise SetupError(f"no space left on device (ENOSPC) writing {tmp}: {full}; the checkpoint was not "
                             f"saved and its partial files are removed; "
                             + (f"the last good checkpoint is iteration {last}" if last is not None
                                else "no checkpoint was written before") +
                             f" (still published); free space in {root} or give another --save, then resume "
                             "with --load") from None
        raise


def _disk_full(root, exc) -> str:
    """'' unless `exc` (or its cause) is ENOSPC/EDQUOT or `root`'s filesystem has almost no space left."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f"{free:,} bytes free" if free < MIN_FREE_BYTES else ""


def _tracked_iteration(root):
    try:
        with open(os.path.join(root, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def publish(root, iteration):
    """Once every rank has written iteration's tmp directory: rename it and point the tracker at it."""
    final = _iter_dir(root, iteration)
    _barrier()
    shared_storage.check_complete(final + ".tmp", iteration)  # every rank's files visible to rank 0
    if _rank0():
        if os.path.isdir(final):  # re-saving the same iteration: keep the old one until replaced
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.rename(final, final + ".old")
        os.rename(final + ".tmp", final)
        _fsync_dir(root)
        _write_tracker(root, iteration)
        shutil.rmtree(final + ".old", ignore_errors=True)
    _barrier()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tracker(root, iteration):
    path = os.path.join(root, TRACKER)
    with open(path + ".tmp", "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    _fsync_dir(root)


def find_checkpoint(args):
    """(directory, iteration) to resume from, or None to start from scratch."""
    root = args.load
    if args.ckpt_step is not None:
        path = _iter_dir(root, args.ckpt_step)
        if not os.path.isdir(path):
            raise SetupError(f"--ckpt-step {args.ckpt_step}: {path} does not exist")
        return path, args.ckpt_step
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        if args.exit_on_missing_checkpoint:
            raise SetupError(f"--load {root}: no checkpoint ({TRACKER} missing)")
        return None
    try:
        with open(tracker) as f:
            iteration = int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise SetupError(f"unreadable checkpoint tracker {tracker}: {exc}") from None
    path = _iter_dir(root, iteration)
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        path += ".old"  # a crash while re-saving this iteration left the previous copy aside
    if not os.path.isdir(path):
        raise SetupError(f"{tracker} points at iteration {iteration}, but {path} is missing")
    return path, iteration


def is_iteration_dir(path: str) -> bool:
    """Whether `path` is one megatron-core (torch_dist) checkpoint: its .metadata, or a common.pt."""
    return os.path.isfile(os.path.join(path, ".metadata")) or \
        os.path.isfile(os.path.join(path, upstream.COMMON_STATE_FILE))


def read_common_state(path: str, if_deepspeed: str) -> dict:
    """The common state of the megatron-core checkpoint at `path`, whichever way the release that
    wrote it stores it (upstream.py); SetupError naming the problem if it is a DeepSpeed checkpoint
    (`if_deepspeed`: what to do instead), unreadable, not written by this trainer, or written by a
    megatron-core release whose checkpoints this one cannot load."""
    if os.path.isfile(os.path.join(path, DEEPSPEED_METADATA)):  # see megatron_patch/deepspeed
        raise SetupError(f"{path} is a DeepSpeed checkpoint; {if_deepspeed}")
    try:
        common = upstream.load_common_state(path)
    except upstream.load_errors() as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise SetupError(f"unreadable checkpoint {path}: {load_failures.explain(exc, path)}") from None
    if not isinstance(common, dict) or common.get("format_version") != FORMAT_VERSION:
        raise SetupError(f"{path} is not a checkpoint written by megatron_patch's trainer")
    if not upstream.can_load_checkpoint_from(upstream.common_state_location(path)):
        written = common.get("megatron_core_version", "0.19 or newer")
        raise SetupError(f"checkpoint {path} was written by megatron-core {written}, which keeps its common state "
                         f"inside the torch_dist files; megatron-core {upstream.VERSION} (installed) cannot load it: "
                         "resume, evaluate or export it under megatron-core 0.19.x (Python 3.12)")
    return common


def read_checkpoint_header(args, vocab_size, padded_vocab_size):
    """(path, common state) of the checkpoint --load resumes from, checked against this run; or
    None. Cheap (reads the tracker and the common state): done before datasets and model are built."""
    found = find_checkpoint(args)
    if found is None:
        if os.path.isdir(args.load) and _rank0():
            print(f" > --load {args.load} holds no checkpoint ({TRACKER} missing): starting from scratch", flush=True)
        return None
    path, _ = found
    common = read_common_state(path, "resume it with --deepspeed and the same --deepspeed-config")
    if common["vocab_size"] != vocab_size:
        raise SetupError(f"vocabulary mismatch: checkpoint {path} has vocab {common['vocab_size']}, this run's "
                         f"tokenizer {vocab_size}; use the tokenizer the checkpoint was trained with")
    if common["padded_vocab_size"] != padded_vocab_size:  # another TP size (build() then uses the checkpoint's)
        _, notice = padded_vocab_size_on_resume(common["padded_vocab_size"], vocab_size, args)
        if notice and _rank0():
            print(f" > {notice}", flush=True)
    differences = model_flag_differences(common["args"], args)
    if differences:
        raise SetupError(f"checkpoint {path} was trained with other model flags: {'; '.join(differences)}; "
                         "resume with the checkpoint's values")
    saved_seed = common["args"].get("seed")
    if saved_seed is not None and saved_seed != args.seed and not args.finetune and _rank0():
        # GPTDataset shuffles with --seed: the consumed-sample count then points into another order.
        print(f" > --seed {args.seed} differs from the checkpoint's {saved_seed}: the data order is reshuffled from "
              "here (samples already trained on may repeat, others be skipped); resume with "
              f"--seed {saved_seed} to continue its order", flush=True)
    if not args.no_load_optim and common["has_optimizer"] \
            and common["use_distributed_optimizer"] != args.use_distributed_optimizer:
        raise SetupError("the checkpoint's optimizer state was saved "
                         f"{'with' if common['use_distributed_optimizer'] else 'without'} "
                         "--use-distributed-optimizer; match it or pass --no-load-optim")
    return path, common


def load_checkpoint(ctx, state, header) -> bool:
    """Restore model (+ optimizer, scheduler, RNG, data position) from `header`'s checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_patch.compat import distributed_optimizer as dopt_fix

    args = ctx.args
    if header is None:
        return False
    path, common = header
    load_optim = not args.no_load_optim and common["has_optimizer"]
    dims = ("tp", "pp", "dp") if args.data_parallel_random_init else ("tp", "pp")
    same_layout = all(common["layout"][k] == _layout()[k] for k in dims) \
        and common["args"].get("data_parallel_random_init") == args.data_parallel_random_init
    metadata = dist_checkpointing.load_content_metadata(path) or _optimizer_metadata(args)
    same_model_layout = all(common["layout"][k] == _layout()[k] for k in ("tp", "pp"))
    if load_optim and not same_model_layout and metadata.get("distrib_optim_sharding_type") == "dp_reshardable":
        raise SetupError(f"{path}: its distributed-optimizer state (dp_reshardable) was saved at "
                         f"TP={common['layout']['tp']} PP={common['layout']['pp']} and cannot be resharded; "
                         "resume at that layout, pass --no-load-optim, or save with "
                         "--dist-ckpt-optim-fully-reshardable")
    load_rng = not args.no_load_rng and common["has_rng"] and same_layout
    if not args.no_load_rng and common["has_rng"] and not same_layout and _rank0():
        print(f" > checkpoint layout {common['layout']} differs from {_layout()}: RNG states not restored",
              flush=True)

    sd = _sharded_state_dict(ctx, load_optim, load_rng, True, metadata)
    try:
        loaded, notes = checkpoint_keys.load_sharded(sd, path, _load_strategy(args, path))
        for i, chunk in enumerate(ctx.model):
            notes += checkpoint_keys.load_module_state(unwrap(chunk), loaded[f"model{i}"])
        if load_optim:
            dopt_fix.load_state_dict(ctx.optimizer, loaded["optimizer"],
                                     keep_saved_schedule=args.use_checkpoint_opt_param_scheduler)
            optimizer.refuse_another_schedule(args, ctx.scheduler, loaded["opt_param_scheduler"], path)
            ctx.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    except SetupError:
        raise
    except upstream.load_errors() as exc:  # noqa: BLE001
        if os.environ.get("MEGATRON_PATCH_DEBUG"):
            raise
        raise SetupError(f"cannot load checkpoint {path}: {load_failures.explain(exc, path)}") from None
    if _rank0() and notes:
        print(checkpoint_keys.notice(path, notes), flush=True)
    if load_rng:
        rng_notice = rng_state.restore(loaded["rng_state"], args.seed, args.data_parallel_random_init)
        if rng_notice and _rank0():
            print(f" > {rng_notice}", flush=True)
    saved_windows = common.get("spike_detector")
    for detector in _spike_detectors(ctx) if saved_windows and not args.finetune else []:
        if not any(w.values for w in detector.windows.values()):  # a resume; a rollback keeps its own
            detector.load_state_dict(saved_windows)
    if not args.finetune:
        state.iteration = common["iteration"]
        state.consumed_train_samples = common["consumed_train_samples"]
        state.consumed_valid_samples = common["consumed_valid_samples"]
    if _rank0():
        print(f" > loaded checkpoint {path} (iteration {common['iteration']}, "
              f"optimizer {'yes' if load_optim else 'no'}, rng {'yes' if load_rng else 'no'})", flush=True)
    return True
