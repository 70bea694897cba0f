"""The training loop on megatron-core's schedules (get_forward_backward_func), and evaluation."""

import contextlib
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, List, Optional, Tuple

import torch

from .callbacks import CallbackList, StepState
from .errors import SetupError, TrainingDiverged
from .model_builder import unwrap


def add_training_args(parser):
    g = parser.add_argument_group("training", "Megatron-LM's flags: same names, defaults and meaning.")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="Sequences per micro-batch per data-parallel rank (required).")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Default: micro-batch size x data-parallel size (no accumulation).")
    g.add_argument("--rampup-batch-size", nargs="*", default=None,
                   help="Refused with --train-iters, as in Megatron-LM.")
    g.add_argument("--train-iters", type=int, default=None, help="Optimizer steps to train for (required).")
    g.add_argument("--train-samples", type=int, default=None, help="Not supported; use --train-iters.")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Stop (after saving, if --save) when the iteration is a multiple of this.")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="Stop (after saving, if --save) once this much wall time has passed.")
    g.add_argument("--eval-interval", type=int, default=1000, help="Validate every N steps.")
    g.add_argument("--eval-iters", type=int, default=100, help="Validation batches per evaluation.")
    g.add_argument("--skip-train", action="store_true", help="Only evaluate.")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="Do not stop on NaN gradients.")
    g.add_argument("--max-consecutive-skipped-iterations", type=int, default=50,
                   help="Stop (exit 1, nothing saved) after this many skipped updates in a row: "
                        "loss-scale overflows or updates the stability monitor refused. A run "
                        "that gets there has diverged. 0: never stop. fp16's first steps overflow "
                        "while the scale comes down from 2^32, about 20 of them.")
    g.add_argument("--empty-unused-memory-level", type=int, default=0, help="Accepted.")
    g.add_argument("--manual-gc", action="store_true", help="Accepted.")
    return parser


def validate_training_args(args) -> None:
    if args.rampup_batch_size:
        raise SetupError("expected no batch-size rampup for iteration-based training "
                         "(--rampup-batch-size with --train-iters, as Megatron-LM)")
    if args.train_samples is not None:
        raise SetupError("--train-samples is not supported; give --train-iters")
    if args.train_iters is None:
        raise SetupError("--train-iters is required")
    if args.micro_batch_size is None or args.micro_batch_size < 1:
        raise SetupError("--micro-batch-size is required (>= 1)")
    if args.global_batch_size is not None and args.global_batch_size < 1:
        raise SetupError(f"--global-batch-size {args.global_batch_size}: must be >= 1")
    if args.train_iters < 0:
        raise SetupError(f"--train-iters {args.train_iters}: must be >= 0")
    step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = step
    if args.global_batch_size % step:
        raise SetupError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size "
                         f"{args.data_parallel_size} (= {step})")
    args.num_microbatches = args.global_batch_size // step
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % pp:
        raise SetupError(f"interleaved pipelining needs the number of micro-batches "
                         f"({args.num_microbatches}) to be a multiple of PP ({pp})")
    if args.max_consecutive_skipped_iterations < 0:
        raise SetupError("--max-consecutive-skipped-iterations must be >= 0 (0: never stop)")
    if args.eval_iters < 0 or (args.eval_interval is not None and args.eval_interval < 0):
        raise SetupError("--eval-iters and --eval-interval must be >= 0")


@dataclass
class TrainState:
    """What a checkpoint must restore besides the model and optimizer."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0


HISTORY_WINDOW = 10_000  # iterations kept in TrainContext.history


class BoundedHistory(list):
    """The last `maxlen` per-iteration records (a list: it slices and serialises as one), so a long
    run does not keep one dict per iteration for its whole length."""

    def __init__(self, maxlen: int = HISTORY_WINDOW):
        super().__init__()
        self.maxlen = maxlen

    def append(self, record: dict) -> None:
        super().append(record)
        if len(self) > self.maxlen:
            del self[: len(self) - self.maxlen]


@dataclass
class TrainContext:
    """Everything one run holds; the trainer and its helpers set only the fields declared here."""

    args: Any
    model: List[Any]
    optimizer: Any
    scheduler: Any
    config: Any
    runtime: Any
    vocab_size: int
    padded_vocab_size: int
    logger: Any = None
    callbacks: CallbackList = field(default_factory=CallbackList)
    history: BoundedHistory = field(default_factory=BoundedHistory)  # the last HISTORY_WINDOW iterations
    resumed: bool = False  # loaded a checkpoint
    datasets: Any = None  # (train, valid, test) as built: a rollback rebuilds the train iterators from them
    train_iterators: Optional[List[Any]] = None  # replaced by a rollback
    z_loss: Optional[float] = None  # this step's z-loss (None with --z-loss-coeff 0)
    lr_scale: Tuple[float, int] = (1.0, 0)  # (factor, until iteration): a post-rollback lr cool-down
    rollbacks: List[Tuple[int, int]] = field(default_factory=list)  # (spiked iteration, reloaded iteration)
    stop_reason: Optional[str] = None  # why train() returned: done, exit signal, time, ...
    state: Optional[TrainState] = None  # the final TrainState, after train() returns


def loss_func(loss_mask, output_tensor, model=None):
    """Token-summed loss + token count (megatron-core's 3-tuple: it divides by both counts).
    With the z-loss on, the loss back-propagated includes it, and the reports hold the
    cross-entropy ("lm loss") and the z-loss ("z loss") apart."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    z = getattr(unwrap(model), "z_loss_per_token", None) if model is not None else None
    reports = {}
    if z is not None:
        z_sum = torch.sum(z.float().reshape(-1) * mask)
        reports["z loss"] = torch.cat([z_sum.view(1), mask.sum().detach().view(1)])
        lm = loss.detach() - z_sum
    else:
        lm = loss.detach()
    reports["lm loss"] = torch.cat([lm.view(1), mask.sum().detach().view(1)])
    return loss, num_tokens, reports


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"], model=model)


def wire_schedule_config(ctx) -> None:
    """Hooks megatron-core's schedules call: loss scaling, no_sync, grad finalisation."""
    from megatron.core.distributed import finalize_model_grads

    config, model = ctx.config, ctx.model
    config.grad_scale_func = ctx.optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if ctx.args.overlap_grad_reduce:
        config.grad_sync_func = [m.start_grad_sync for m in model]
        if len(model) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    # --overlap-param-gather: DDP gathers the updated shards in forward pre-hooks (Megatron-LM's
    # default, no align_param_gather); see params_in_sync() for evaluation and checkpoints.


@contextlib.contextmanager
def params_in_sync(ctx):
    """Full, current parameters on every rank (with --overlap-param-gather the distributed
    optimizer leaves other ranks' shards stale until the next forward pre-hook)."""
    hooked = [m for m in ctx.model if getattr(m, "use_forward_hook", False)]
    for m in hooked:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in hooked:
            m.enable_forward_pre_hook()


def _forward_backward(ctx, iterators, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = ctx.args
    data = iterators if len(iterators) > 1 else iterators[0]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data,
        model=ctx.model if len(ctx.model) > 1 else ctx.model[0],
        num_microbatches=args.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, decoder_seq_length=args.seq_length,
        forward_only=forward_only)


def _reduce_loss(losses_reduced, key="lm loss") -> Optional[float]:
    """Token-weighted mean of a report over micro-batches and DP ranks; None off the last
    pipeline stage (or when the report is not there: "z loss" with the z-loss off)."""
    from megatron.core import parallel_state

    if not losses_reduced or key not in losses_reduced[0]:
        return None
    total = torch.stack([d[key] for d in losses_reduced]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def _loss_on_all_ranks(loss, device) -> float:
    """The last stage's loss, on every rank (for callbacks)."""
    from megatron.core import parallel_state

    t = torch.tensor([loss if loss is not None else 0.0], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
    return float(t.item())


# Why an update was not applied (the third value a step function returns; None: applied).
SKIP_OVERFLOW = "overflow"  # the fp16 loss scaler found Inf/NaN gradients and lowered the scale
SKIP_MONITOR = "monitor"  # a callback (the stability monitor) vetoed it: a spike or non-finite step


def train_step(ctx, state, iterators):
    """One global batch: forward/backward over its micro-batches, then the optimizer step.
    Returns (loss, grad norm or None, skip reason or None)."""
    for chunk in ctx.model:
        chunk.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    try:
        reports = _forward_backward(ctx, iterators, forward_only=False)
        loss = _reduce_loss(reports)
        ctx.z_loss = _reduce_loss(reports, "z loss")  # None with the z-loss off
    except RuntimeError:  # megatron-core's NaN check (check_for_nan_in_grad) stops the reduction ...
        if not _gradients_non_finite(ctx):  # ... which our own check confirms; anything else propagates
            raise
        raise TrainingDiverged(f"iteration {state.iteration + 1}: megatron-core found non-finite gradients; "
                               "the run has diverged; lower --lr, keep --clip-grad on, or let --spike-policy "
                               "skip such steps") from None
    skip = False
    if ctx.callbacks:
        loss = _loss_on_all_ranks(loss, ctx.runtime.device)
        skip = ctx.callbacks.on_before_optimizer_step(
            StepState(state.iteration + 1, ctx.model, ctx.optimizer, ctx.args, loss=loss))
    if skip:
        return loss, None, SKIP_MONITOR
    update_ok, grad_norm, _ = ctx.optimizer.step()
    if not update_ok:  # as Megatron-LM: a skipped update does not advance the schedule
        return loss, grad_norm, SKIP_OVERFLOW
    ctx.scheduler.step(increment=ctx.args.global_batch_size)
    apply_lr_scale(ctx, state.iteration + 1)
    return loss, grad_norm, None


def _gradients_non_finite(ctx) -> bool:
    """Whether this rank's gradient buffers hold a NaN or Inf (megatron-core DDP's grad buffers)."""
    for chunk in ctx.model:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            if not torch.isfinite(buffer.grad_data).all():
                return True
    return False


def apply_lr_scale(ctx, iteration) -> None:
    """Scale the lr the scheduler just set while a post-rollback cool-down is on."""
    factor, until = ctx.lr_scale
    if factor != 1.0 and iteration < until:
        for group in ctx.optimizer.param_groups:
            group["lr"] *= factor


def evaluate(ctx, iterators, num_batches) -> Optional[float]:
    """Mean validation loss over `num_batches` global batches (None off the last stage)."""
    for chunk in ctx.model:
        chunk.eval()
    results = []
    with torch.no_grad(), params_in_sync(ctx):
        for _ in range(num_batches):
            results += _forward_backward(ctx, iterators, forward_only=True)
    for chunk in ctx.model:
        chunk.train()
    return _reduce_loss(results)


def _diverged_message(state, reasons, loss, last_saved) -> str:
    counts = ", ".join(f"{r} {reasons.count(r)}" for r in (SKIP_OVERFLOW, SKIP_MONITOR) if r in reasons)
    checkpoint = (f"the last checkpoint is iteration {last_saved}" if last_saved is not None
                  else "no checkpoint was written")
    return (f"iteration {state.iteration}: {len(reasons)} updates in a row were skipped ({counts}; last loss "
            f"{loss}): the run has diverged and stops without saving ({checkpoint}); resume with a lower --lr, "
            "or raise --max-consecutive-skipped-iterations")


def _stop_reason(ctx, signal_handler, start_time) -> Optional[str]:
    """'signal' / 'time' if any rank wants to stop (one collective, only when either is enabled)."""
    args = ctx.args
    if signal_handler is None and args.exit_duration_in_mins is None:
        return None
    flags = torch.tensor([
        1.0 if signal_handler is not None and signal_handler.pending else 0.0,
        1.0 if args.exit_duration_in_mins is not None
        and time.time() - start_time > 60.0 * args.exit_duration_in_mins else 0.0,
    ], device=ctx.runtime.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return "signal" if flags[0] > 0 else "time" if flags[1] > 0 else None


def train(ctx, state, iterators, valid_iterators, test_iterators, save_fn, signal_handler=None,
          rollback_fn=None, step_fn=train_step, eval_fn=evaluate) -> str:
    """Run until --train-iters (or an exit condition). Returns why it stopped.

    rollback_fn(state, request) -> train iterators: reloads the last checkpoint when a callback
    asks for it (state.extra["rollback"]), see megatron_patch/training/rollback.py.
    step_fn/eval_fn: train_step/evaluate, or the DeepSpeed engine's (megatron_patch/deepspeed)."""
    args, log = ctx.args, ctx.logger
    start_time, last_saved = time.time(), state.iteration if ctx.resumed else None
    step_state = StepState(state.iteration, ctx.model, ctx.optimizer, args)
    ctx.callbacks.on_train_start(step_state)

    def save():
        nonlocal last_saved
        if args.save and last_saved != state.iteration:
            with params_in_sync(ctx):
                save_fn(state)
            last_saved = state.iteration

    def run_eval(label, its, batches, valid):
        loss = eval_fn(ctx, its, batches)
        if valid:
            state.consumed_valid_samples += batches * args.global_batch_size
        if loss is not None:
            ppl = log.log_evaluation(label, state.iteration, loss)
            ctx.callbacks.on_eval_end(step_state, {"lm loss": loss, "ppl": ppl})

    reason, skipped_in_a_row = "done", []
    while not args.skip_train and state.iteration < args.train_iters:
        if ctx.callbacks:  # one place for both engines' step_fn
            ctx.callbacks.on_step_start(StepState(state.iteration + 1, ctx.model, ctx.optimizer, args))
        t0 = time.perf_counter()
        loss, grad_norm, skip_reason = step_fn(ctx, state, iterators)
        skipped = skip_reason is not None
        step_time = time.perf_counter() - t0
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        lr = ctx.optimizer.param_groups[0]["lr"]
        loss_scale = float(ctx.optimizer.get_loss_scale())
        grad_norm = None if grad_norm is None else float(grad_norm)
        ctx.history.append({"iteration": state.iteration, "loss": loss, "grad_norm": grad_norm,
                            "lr": lr, "loss_scale": loss_scale, "skipped": skipped, "skip_reason": skip_reason,
                            "z_loss": ctx.z_loss})
        log.log_iteration(state.iteration, state.consumed_train_samples, loss, lr, loss_scale,
                          grad_norm, skip_reason, step_time, z_loss=ctx.z_loss)
        limit = args.max_consecutive_skipped_iterations
        skipped_in_a_row = skipped_in_a_row + [skip_reason] if skipped and limit else []
        if limit and len(skipped_in_a_row) >= limit:
            raise TrainingDiverged(_diverged_message(state, skipped_in_a_row, loss, last_saved))
        step_state = StepState(state.iteration, ctx.model, ctx.optimizer, args, loss=loss,
                               grad_norm=grad_norm, learning_rate=lr, skipped=skipped)
        ctx.callbacks.on_step_end(step_state)
        if rollback_fn is not None and "rollback" in step_state.extra:
            iterators = rollback_fn(state, step_state.extra["rollback"])
            skipped_in_a_row = []  # a fresh start from the checkpoint
            continue
        if valid_iterators and args.eval_iters and args.eval_interval \
                and state.iteration % args.eval_interval == 0:
            run_eval(f"iteration {state.iteration}", valid_iterators, args.eval_iters, True)
        if args.save_interval and state.iteration % args.save_interval == 0:
            save()
        stop = _stop_reason(ctx, signal_handler, start_time)
        if stop is None and args.exit_interval and state.iteration % args.exit_interval == 0:
            stop = "exit-interval"
        if stop is not None:
            save()
            log.print(f" > exiting after iteration {state.iteration} ({stop})")
            return stop

    save()
    if valid_iterators and args.eval_iters and (args.skip_train or not args.eval_interval
                                                or state.iteration % args.eval_interval):
        run_eval(f"iteration {state.iteration} on validation set", valid_iterators, args.eval_iters, True)
    if test_iterators and args.eval_iters:
        run_eval(f"iteration {state.iteration} on test set", test_iterators, args.eval_iters, False)
    ctx.callbacks.on_train_end(step_state)
    return reason
