"""Optimizer (megatron-core get_megatron_optimizer), mixed precision and the LR/WD schedule."""

import torch

from .errors import SetupError


def add_optimizer_args(parser):
    g = parser.add_argument_group("optimizer and regularization",
                                  "Megatron-LM's flags: same names, defaults and meaning.")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam is AdamW (decoupled weight decay), as in Megatron-LM.")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW/SGD weight decay (norms, biases and WeSaR gates excluded).")
    g.add_argument("--start-weight-decay", type=float, default=None,
                   help="Weight decay at step 0 when it changes over the run.")
    g.add_argument("--end-weight-decay", type=float, default=None,
                   help="Weight decay at the end when it changes over the run.")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"],
                   default="constant", help="How weight decay moves from start to end.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Global grad-norm clip (0 = off).")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam-beta2", type=float, default=0.999,
                   help="Adam beta2 (the paper: 0.999; 0.95 at 13B [unverified]).")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")
    g.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum (--optimizer sgd).")

    g = parser.add_argument_group("learning rate", "Megatron-LM's flags: same names, defaults and meaning.")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the end of the decay.")
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   help="Learning-rate decay after the warm-up.")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default --train-iters.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warm-up steps.")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="Warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters).")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of the warm-up.")
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   help="Decay shape of WSD's final phase.")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="Steps in WSD's final decay phase.")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="Take the schedule from the flags, not from the checkpoint.")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="Take the schedule from the checkpoint.")

    g = parser.add_argument_group(
        "mixed precision", "fp16/bf16 through megatron-core's Float16Module, fp32 main params and "
        "grad scaler; on CPU too (slow: it is there to run the GPU's code path).")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 with dynamic loss scaling (unless --loss-scale); the NaN/Inf gradient "
                        "check is then off, as in Megatron-LM: an overflow is the scaler's signal.")
    g.add_argument("--bf16", action="store_true",
                   help="bf16; gradients are accumulated and all-reduced in fp32 (Megatron-LM's rule) "
                        "unless --grad-reduce-in-bf16.")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="With --bf16: accumulate and all-reduce gradients in bf16 (halves the "
                        "gradient traffic, loses precision).")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="Static loss scale (fp16); default: dynamic loss scaling.")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32,
                   help="fp16 dynamic loss scaling: the starting scale.")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16 dynamic loss scaling: the lowest scale.")
    g.add_argument("--loss-scale-window", type=float, default=1000,
                   help="fp16 dynamic loss scaling: clean steps before the scale doubles.")
    g.add_argument("--hysteresis", type=int, default=2,
                   help="fp16 dynamic loss scaling: overflows tolerated before the scale halves.")
    return parser


def validate_optimizer_args(args, on_cuda: bool) -> None:
    if args.lr is None:
        raise SetupError("--lr is required")
    validate_precision_args(args, on_cuda)
    if args.clip_grad < 0:
        raise SetupError(f"--clip-grad {args.clip_grad}: must be >= 0 (0 turns clipping off)")
    if args.min_lr > args.lr:
        raise SetupError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if args.start_weight_decay is None:
        args.start_weight_decay = args.weight_decay
    if args.end_weight_decay is None:
        args.end_weight_decay = args.weight_decay
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise SetupError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                         "are exclusive")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise SetupError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    if args.train_iters == 0:  # a run that only writes the initial checkpoint
        args.lr_decay_iters = max(args.lr_decay_iters, args.lr_warmup_iters + 1)
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise SetupError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay "
                         f"length {args.lr_decay_iters} (--lr-decay-iters, default --train-iters)")
    if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None:
        raise SetupError("--lr-decay-style WSD needs --lr-wsd-decay-iters")


def validate_precision_args(args, on_cuda: bool) -> None:
    """Megatron-LM's precision rules (megatron/training/arguments.py): under fp16 with dynamic loss
    scaling an Inf/NaN gradient is the scaler's normal signal (it skips the step and lowers the
    scale), so the gradient NaN check, which would stop the run, is turned off; bf16 accumulates
    and all-reduces gradients in fp32 unless --grad-reduce-in-bf16 asks otherwise."""
    if args.fp16 and args.bf16:
        raise SetupError("--fp16 and --bf16 are exclusive")
    if args.grad_reduce_in_bf16 and not args.bf16:
        raise SetupError("--grad-reduce-in-bf16 needs --bf16")
    if args.grad_reduce_in_bf16 and args.accumulate_allreduce_grads_in_fp32:
        raise SetupError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 are exclusive")
    if args.loss_scale is not None and (args.loss_scale <= 0 or not args.fp16):
        raise SetupError("--loss-scale (a static loss scale) must be > 0 and needs --fp16")
    notes = []
    if args.fp16 and not args.loss_scale and args.check_for_nan_in_loss_and_grad:
        args.check_for_nan_in_loss_and_grad = False
        notes.append("fp16 with dynamic loss scaling: gradient NaN/Inf check off (overflowed steps are "
                     "skipped by the loss scaler and counted)")
    if args.bf16 and not args.grad_reduce_in_bf16 and not args.accumulate_allreduce_grads_in_fp32 \
            and not getattr(args, "deepspeed", False):  # DeepSpeed: data_types.grad_accum_dtype
        args.accumulate_allreduce_grads_in_fp32 = True
        notes.append("bf16: gradients accumulated and all-reduced in fp32")
    if (args.fp16 or args.bf16) and not on_cuda:
        notes.append(f"{'fp16' if args.fp16 else 'bf16'} on CPU runs the GPU's mixed-precision code, slowly")
    args.precision_notes = notes


def optimizer_config_from_args(args):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )


def build_optimizer(args, model_chunks):
    """megatron-core optimizer over the DDP chunks, with this package's weight-decay groups."""
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_patch.optim import param_group_overrides

    config = optimizer_config_from_args(args)
    overrides = param_group_overrides(config, args.no_embedding_weight_decay)
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


def build_scheduler(args, optimizer):
    """OptimizerParamScheduler counted in samples, as Megatron-LM does for iteration-based runs."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=max(args.train_iters, 1) * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=(args.lr_wsd_decay_iters * gbs) if args.lr_wsd_decay_iters else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


# What megatron-core's OptimizerParamScheduler.load_state_dict checks against the checkpoint (an
# assert) unless --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler: the
# scheduler's attribute and the state-dict key share these names in every supported release.
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                 "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")


def schedule_mismatches(scheduler, saved: dict) -> list:
    """(key, this run's value, the checkpoint's value) for each schedule value that differs."""
    return [(key, getattr(scheduler, key), saved[key]) for key in SCHEDULE_KEYS
            if key in saved and hasattr(scheduler, key) and getattr(scheduler, key) != saved[key]]


def refuse_another_schedule(args, scheduler, saved: dict, path) -> None:
    """One line where megatron-core's scheduler would assert on a schedule value that changed."""
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    differ = schedule_mismatches(scheduler, saved)
    if differ:
        named = ", ".join(f"{key} {ours} here, {theirs} in the checkpoint" for key, ours, theirs in differ)
        raise SetupError(f"checkpoint {path}: this run's lr schedule differs from the checkpoint's ({named}); "
                         "resume with the checkpoint's --train-iters / --lr-decay-iters / --lr-warmup-iters / "
                         "--lr, or pass --override-opt_param-scheduler to use this run's")
