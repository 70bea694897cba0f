"""pretrain_gpt.py's command line: Megatron-LM's flag names, grouped, plus the stabilization flags.

Each group is defined next to the code that uses it (model_builder, loop, optimizer, data,
checkpointing, logging, initialize), except --dry-run's, defined here because dry_run.py reads this
parser; this module assembles them and runs every check that needs no process group, model or data
read, so a bad flag fails in a second with one line.
"""

import argparse
import math

from megatron_patch import capabilities
from megatron_patch.stability_flags import add_stability_args

from . import checkpointing, data, initialize, logging, loop, model_builder, optimizer, save_dir
from .errors import SetupError


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless the help names it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.option_strings and action.nargs != 0 and action.default not in (None, "", argparse.SUPPRESS)
        return f"{text} (default: %(default)s)" if shown and "default" not in text.lower() else text


class _Parser(argparse.ArgumentParser):
    """argparse that raises SetupError (one line, printed by pretrain_gpt.py) instead of usage text."""

    def error(self, message):
        raise SetupError(f"{message} (see --help)")


def add_dry_run_args(parser):
    """--dry-run and its flags (the plan itself: dry_run.py)."""
    g = parser.add_argument_group("dry run", "Plan a run: parameters, memory per GPU, tokens and FLOPs "
                                             "per step; builds nothing.")
    g.add_argument("--dry-run", action="store_true", help="Print the plan and exit (1 if it does not fit).")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="Memory of one GPU in GB (1e9 bytes) for the fit check (default 80).")
    g.add_argument("--world-size", dest="dry_run_world_size", type=int, default=None,
                   help="Dry run only: GPUs to plan for (default WORLD_SIZE, else NNODES x GPUS_PER_NODE, else 1).")
    return parser


def build_parser(prog="pretrain_gpt.py") -> argparse.ArgumentParser:
    from megatron_patch.deepspeed.config import add_deepspeed_args
    from megatron_patch.monitor.callback import add_monitor_args

    parser = _Parser(prog=prog, allow_abbrev=False, formatter_class=_HelpFormatter,
                     description="GPT pre-training on megatron-core with Megatron-LM's flags and "
                                 "loss-spike stabilization (Spike No More, WeSaR).")
    model_builder.add_model_args(parser)
    loop.add_training_args(parser)
    optimizer.add_optimizer_args(parser)
    initialize.add_distributed_args(parser)
    data.add_data_args(parser)
    checkpointing.add_checkpointing_args(parser)
    logging.add_logging_args(parser)
    add_stability_args(parser)
    add_monitor_args(parser)
    add_deepspeed_args(parser)  # --deepspeed (megatron_patch/deepspeed)
    add_dry_run_args(parser)
    return parser


# Numeric flags and the values that make sense: (low, high, low included, high included); None:
# unbounded. Every float flag must also be finite (a NaN lr reached torch's Adam as a traceback).
RANGES = {
    "lr": (0, None, True, None), "min_lr": (0, None, True, None), "lr_warmup_init": (0, None, True, None),
    "lr_warmup_fraction": (0, 1, True, True),
    "weight_decay": (0, None, True, None), "start_weight_decay": (0, None, True, None),
    "end_weight_decay": (0, None, True, None),
    "adam_beta1": (0, 1, True, False), "adam_beta2": (0, 1, True, False), "adam_eps": (0, None, True, None),
    "sgd_momentum": (0, None, True, None),
    "hidden_dropout": (0, 1, True, True), "attention_dropout": (0, 1, True, True),
    "rotary_percent": (0, 1, False, True), "norm_epsilon": (0, None, True, None),
    "init_method_std": (0, None, True, None), "embedding_init_method_std": (0, None, True, None),
    "loss_scale": (0, None, False, None), "initial_loss_scale": (0, None, False, None),
    "min_loss_scale": (0, None, False, None), "z_loss_coeff": (0, None, True, None),
    "exit_duration_in_mins": (0, None, False, None),
}
INFINITE_OK = {"exit_duration_in_mins"}  # inf: never stop for time


def _check_numbers(parser, args) -> None:
    """Refuse a non-finite float flag, or one outside RANGES, naming the flag and the range."""
    for action in parser._actions:
        if action.type is not float or getattr(args, action.dest, None) is None:
            continue
        flag, value = action.option_strings[0], getattr(args, action.dest)
        if math.isnan(value) or (math.isinf(value) and action.dest not in INFINITE_OK):
            raise SetupError(f"{flag} {value}: must be a finite number")
        low, high, low_in, high_in = RANGES.get(action.dest, (None, None, None, None))
        too_low = low is not None and (value < low or (value == low and not low_in))
        too_high = high is not None and (value > high or (value == high and not high_in))
        if too_low or too_high:
            bounds = (f"{'[' if low_in else '('}{low}, " if low is not None else "(-inf, ") + \
                     (f"{high}{']' if high_in else ')'}" if high is not None else "inf)")
            raise SetupError(f"{flag} {value}: must lie in {bounds}")


def _raise_setup_error(message):
    raise SetupError(message)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args, world_size=None) -> argparse.Namespace:
    """Fill derived values and refuse bad or contradictory flags (raises SetupError). The checks
    that need no megatron-core run first, so most bad flags fail before it is imported."""
    from megatron_patch.deepspeed.config import validate_deepspeed_args
    from megatron_patch.monitor.callback import validate_monitor_args

    _check_numbers(build_parser(), args)
    world_size = initialize.world_size_from_env() if world_size is None else world_size
    args.world_size = world_size
    on_cuda = capabilities.on_cuda()
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(args, flag) is None:
            raise SetupError(f"--{flag.replace('_', '-')} is required")
        if getattr(args, flag) < 1:
            raise SetupError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    initialize.validate_distributed_args(args, world_size)
    model_builder.validate_model_args(args)
    loop.validate_training_args(args)
    optimizer.validate_optimizer_args(args, on_cuda)
    data.validate_data_args(args)
    checkpointing.validate_checkpointing_args(args)
    logging.validate_logging_args(args)
    for flag, path in (("--tensorboard-dir", args.tensorboard_dir), ("--wandb-save-dir", args.wandb_save_dir),
                       ("--monitor-dir", getattr(args, "monitor_dir", None))):  # checked as --save is
        problem = path and save_dir.output_dir_problem(flag, path)
        if problem:
            raise SetupError(problem)
    validate_monitor_args(args, fail=_raise_setup_error)
    validate_deepspeed_args(args)  # no-op without --deepspeed
    from megatron_patch.config import StabilityConfigError, stability_kwargs  # imports megatron-core

    try:
        stability_kwargs(args)
    except StabilityConfigError as exc:
        raise SetupError(str(exc)) from None
    # Building the config runs megatron-core's own consistency checks (cheap: no tensors).
    args.transformer_config = model_builder.transformer_config_from_args(args)
    return args


def parse_and_validate(argv=None, world_size=None) -> argparse.Namespace:
    return validate_args(parse_args(argv), world_size)
