"""--deepspeed / --deepspeed-config: the DeepSpeed JSON, checked against the trainer's flags.

The flags stay the one source of the batch sizes, gradient clipping, precision, optimizer and lr
schedule, as on the Megatron path. The JSON may repeat a value (it must then agree with the flag)
or leave it out (it is filled in from the flag); its own business is ZeRO (`zero_optimization`)
and DeepSpeed's communication and logging settings. Runs before any process group exists, so a
bad file or flag fails in a second with one line.
"""

import importlib.util
import json
import math

from megatron_patch import capabilities
from megatron_patch.training.errors import SetupError

# Flags that configure what --deepspeed replaces (megatron-core's DDP, distributed optimizer,
# checkpoint contents) or that the DeepSpeed path cannot honour, with what to do instead.
_REFUSED = (
    ("use_distributed_optimizer", "--use-distributed-optimizer",
     "ZeRO (zero_optimization.stage in the JSON) shards the optimizer state; drop the flag"),
    ("overlap_grad_reduce", "--overlap-grad-reduce",
     "it configures megatron-core's DDP; set zero_optimization.overlap_comm in the JSON instead"),
    ("accumulate_allreduce_grads_in_fp32", "--accumulate-allreduce-grads-in-fp32",
     "it configures megatron-core's DDP; set data_types.grad_accum_dtype in the JSON instead"),
    ("sequence_parallel", "--sequence-parallel",
     "its LayerNorm gradients are reduced by megatron-core's DDP; drop the flag"),
    ("data_parallel_random_init", "--data-parallel-random-init",
     "DeepSpeed broadcasts data-parallel rank 0's weights; drop the flag"),
    ("finetune", "--finetune", "DeepSpeed checkpoints are resumed whole; drop the flag"),
    ("no_load_optim", "--no-load-optim", "DeepSpeed checkpoints are resumed whole; drop the flag"),
    ("no_save_optim", "--no-save-optim", "DeepSpeed checkpoints always hold the optimizer; drop the flag"),
    ("no_load_rng", "--no-load-rng", "DeepSpeed checkpoints are resumed whole; drop the flag"),
    ("no_save_rng", "--no-save-rng", "DeepSpeed checkpoints always hold the RNG state; drop the flag"),
)


def add_deepspeed_args(parser):
    g = parser.add_argument_group(
        "deepspeed", "Train with DeepSpeed's engine (ZeRO stages 0-3) instead of megatron-core's DDP "
                     "and optimizer; same model, data, optimizer groups and lr schedule (docs/deepspeed.md).")
    g.add_argument("--deepspeed", action="store_true", help="Use DeepSpeed (needs --deepspeed-config).")
    g.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON (zero_optimization, ...); batch sizes, clipping and precision "
                        "come from the flags and must agree if repeated. See examples/deepspeed/.")
    return parser


def validate_deepspeed_args(args) -> None:
    """Check --deepspeed against the other flags and read its JSON into args.deepspeed_config_dict
    (completed from the flags) and args.zero_stage. Without --deepspeed nothing changes."""
    if not args.deepspeed:
        if args.deepspeed_config:
            raise SetupError("--deepspeed-config needs --deepspeed")
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise SetupError("--deepspeed needs the deepspeed package: bash tools/setup_env.sh deepspeed "
                         "(or pip install --no-build-isolation deepspeed==0.19.8 after torch)")
    if not args.deepspeed_config:
        raise SetupError("--deepspeed needs --deepspeed-config FILE.json (see examples/deepspeed/zero1.json)")
    _refuse_unsupported_flags(args)
    config = _read_json(args.deepspeed_config)
    _check_keys_and_types(config, args.deepspeed_config)
    _reconcile(config, args)
    _refuse_unsupported_precision(args)
    args.deepspeed_config_dict = config
    args.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
    _refuse_unsupported_monitoring(args)


def _refuse_unsupported_precision(args) -> None:
    """A precision DeepSpeed's accelerator cannot run here: one line now, not its engine's error later."""
    for precision in ("fp16", "bf16"):
        if getattr(args, precision):
            problem = capabilities.deepspeed_precision_problem(precision)
            if problem:
                raise SetupError(problem)


def _refuse_unsupported_monitoring(args) -> None:
    """What the stability monitor cannot read through DeepSpeed's engine."""
    if args.monitor_update_ratio and args.zero_stage == 3:
        raise SetupError("--monitor-update-ratio with ZeRO stage 3: each rank holds only a partition of "
                         "the weights; use stage 0-2 or drop the flag")
    if "update_norm" in args.spike_signal and (args.tensor_model_parallel_size > 1 or args.zero_stage == 3):
        raise SetupError("--spike-signal update_norm with --deepspeed needs TP=1 and ZeRO stage 0-2: DeepSpeed's "
                         "flat partitions do not mark TP-replicated parameters, and ZeRO-3 keeps them out of "
                         "Adam's param groups between steps; use another signal")


def _refuse_unsupported_flags(args) -> None:
    pp = args.pipeline_model_parallel_size
    if pp > 1:
        raise SetupError(f"--deepspeed with --pipeline-model-parallel-size {pp}: pipeline parallelism "
                         "runs on the Megatron engine only; drop --deepspeed or use PP=1")
    if args.optimizer != "adam":
        raise SetupError(f"--optimizer {args.optimizer} is not supported with --deepspeed (ZeRO supports "
                         "Adam-type optimizers); use --optimizer adam")
    for attr, flag, fix in _REFUSED:
        if getattr(args, attr):
            raise SetupError(f"{flag} is not supported with --deepspeed: {fix}")


def _read_json(path) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise SetupError(f"--deepspeed-config {path}: no such file") from None
    except OSError as exc:
        raise SetupError(f"--deepspeed-config {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise SetupError(f"--deepspeed-config {path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno})") from None
    if not isinstance(config, dict):
        raise SetupError(f"--deepspeed-config {path}: expected a JSON object, got {type(config).__name__}")
    return config


# Sections DeepSpeed 0.19.8 reads outside DeepSpeedConfig's own lookups (or that _reconcile refuses).
_OTHER_KNOWN_KEYS = {"optimizer", "scheduler", "flops_profiler", "activation_checkpointing", "aio",
                     "autotuning", "monitor_config"}
# Values that must be numbers (or "auto"), by path in the JSON.
_NUMERIC = (("train_batch_size",), ("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",),
            ("gradient_clipping",), ("zero_optimization", "stage"))


def deepspeed_top_level_keys() -> set:
    """The top-level keys this DeepSpeed reads: recorded while its DeepSpeedConfig parses a minimal
    config (no process group needed), plus the few sections read elsewhere."""
    from .engine import import_deepspeed

    import_deepspeed()  # its accelerator choice first
    from deepspeed.runtime.config import DeepSpeedConfig

    seen = set()

    class Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

    try:
        DeepSpeedConfig(Recording(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    except Exception:  # noqa: BLE001 - whatever it read before failing still counts
        pass
    return {k for k in seen if isinstance(k, str)} | _OTHER_KNOWN_KEYS


def _check_keys_and_types(config, path) -> None:
    """A misspelled section would be ignored by DeepSpeed (zero_optimisation: silently ZeRO-0), a
    string where a number goes would be compared as a string: refuse both in one line."""
    import difflib

    known = deepspeed_top_level_keys()
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SetupError(f"{path}: unknown key '{key}' ({hint}DeepSpeed would ignore it); see "
                             "docs/deepspeed.md")
    for keys in _NUMERIC:
        value = config
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if isinstance(value, bool) or (value is not None and value != "auto" and not isinstance(value, (int, float))):
            raise SetupError(f"{path}: {'.'.join(keys)} must be a number (or \"auto\"), not {json.dumps(value)}")


def _reconcile(config, args) -> None:
    """Make the JSON agree with the flags: refuse contradictions, fill in what it leaves out."""
    path = args.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise SetupError(f"{path}: remove the '{section}' section; with --deepspeed the optimizer and "
                             "lr schedule come from the flags (--lr, --min-lr, --lr-decay-style, "
                             "--adam-beta1, ...), as on the Megatron path")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise SetupError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3")
    _agree(config, "train_micro_batch_size_per_gpu", args.micro_batch_size, "--micro-batch-size", path)
    _agree(config, "gradient_accumulation_steps", args.num_microbatches,
           "--global-batch-size / (--micro-batch-size x data-parallel size)", path)
    _agree(config, "train_batch_size", args.global_batch_size, "--global-batch-size", path)
    _agree(config, "gradient_clipping", args.clip_grad, "--clip-grad", path)
    for key, flag in (("fp16", "--fp16"), ("bf16", "--bf16")):
        section = config.get(key, config.get("bfloat16") if key == "bf16" else None)
        enabled = getattr(args, key)
        in_json = section.get("enabled", False) if isinstance(section, dict) else None
        if in_json is not None and in_json not in ("auto", enabled):
            raise SetupError(f"{path}: {key}.enabled is {in_json}, but {flag} is "
                             f"{'given' if enabled else 'not given'}; make them agree (the model is "
                             "built in the flags' precision; CPU trains in fp32)")
        if section is None and enabled:
            config[key] = _fp16_section(args) if key == "fp16" else {"enabled": True}
        elif isinstance(section, dict):
            section["enabled"] = enabled


def _agree(config, key, value, flag, path) -> None:
    given = config.get(key, "auto")
    if given != "auto" and given != value:
        raise SetupError(f"{path}: {key} is {given}, but {flag} gives {value}; make them agree or "
                         "remove it from the JSON (it is filled in from the flags)")
    config[key] = value


def _fp16_section(args) -> dict:
    """DeepSpeed's loss scaling from the Megatron flags (loss_scale 0 = dynamic)."""
    return {"enabled": True, "loss_scale": args.loss_scale or 0,
            "initial_scale_power": int(math.log2(args.initial_loss_scale)),
            "loss_scale_window": int(args.loss_scale_window), "hysteresis": args.hysteresis,
            "min_loss_scale": args.min_loss_scale}
