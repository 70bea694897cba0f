"""Load a trainer checkpoint (any TP/PP/VP layout) into one TP=1, PP=1 GPTModel, and write one back.

Resharding is megatron-core's: each tensor is stored once with its global shape and the shard
offsets of the layout that wrote it, so a single process asks for the whole tensors and gets them.
"""

import os
import sys
from types import SimpleNamespace

import torch

from megatron_patch import upstream
from megatron_patch.training import checkpoint_keys, checkpointing, load_failures
from megatron_patch.training.errors import SetupError

# Layout-specific flags replaced by one process holding the whole model.
_SINGLE_PROCESS = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
    num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False, context_parallel_size=1,
    world_size=1, data_parallel_size=1, distributed_backend="gloo", use_distributed_optimizer=False,
    overlap_grad_reduce=False, overlap_param_gather=False, data_parallel_random_init=False,
    transformer_impl="local", load=None, save=None, recompute_granularity=None, recompute_method=None,
    recompute_num_layers=None, recompute_activations=False, no_gradient_accumulation_fusion=True,
)


def args_from_saved(saved: dict, **overrides) -> SimpleNamespace:
    """The trainer's flag namespace: parser defaults, then the checkpoint's args, then overrides."""
    from megatron_patch.training.arguments import build_parser

    args = vars(build_parser().parse_args([]))
    args.update({k: v for k, v in saved.items() if k in args or k in ("world_size", "data_parallel_size")})
    args.update(_SINGLE_PROCESS)
    args.update(overrides)
    return SimpleNamespace(**args)


def start_single_process(args):
    """gloo group of one + megatron-core parallel_state at TP=1, PP=1 (undo with `stop`)."""
    from megatron_patch.training import initialize

    initialize.initialize_distributed(args)


def stop():
    from megatron_patch.training import initialize

    initialize.teardown()


def build_model(args, padded_vocab_size: int, activation=None):
    """The GPTModel these flags describe, whole (TP=1, PP=1), with megatron-core's local layers,
    fp32 unless the flags say otherwise, initialised on CPU. `activation` (a checkpoint's
    "activation", see model_builder.activation_name) makes it compute the GELU training computed
    (the fused bias-GELU of GPU runs is the tanh approximation) on any device."""
    from megatron_patch.model import build_gpt_model
    from megatron_patch.training.model_builder import transformer_config_from_args

    config = transformer_config_from_args(SimpleNamespace(**{**vars(args), "use_cpu_initialization": True}),
                                          activation=activation)
    return build_gpt_model(
        config, padded_vocab_size, args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, parallel_output=True,
        transformer_impl="local", rotary_percent=args.rotary_percent, rotary_base=args.rotary_base)


def read_common(load_dir: str, step=None):
    """(path, common state) of `load_dir`'s latest checkpoint (or iteration `step`)."""
    if not os.path.isdir(load_dir):
        raise SetupError(f"--load {load_dir} is not a directory")
    path, _ = checkpointing.find_checkpoint(SimpleNamespace(load=load_dir, ckpt_step=step,
                                                            exit_on_missing_checkpoint=True))
    return path, checkpointing.read_common_state(
        path, "only megatron-core (torch_dist) checkpoints are read here")


def load_model(load_dir: str, step=None):
    """(fp32 GPTModel at TP=1/PP=1 on CPU with the checkpoint's weights, its args, common state).
    Checkpoints of Transformer Engine layers load too (see training/checkpoint_keys.py).
    Call between `start_single_process` and `stop` (see `loaded_checkpoint`)."""
    path, common = read_common(load_dir, step)
    args = args_from_saved(common["args"])
    # fp32 config as well as weights: a bf16 config would cast attention probabilities of fp32
    # inputs back to bf16 (megatron-core's FusedScaleMaskSoftmax with softmax in fp32).
    fp32 = SimpleNamespace(**{**vars(args), "fp16": False, "bf16": False})
    model = build_model(fp32, common["padded_vocab_size"], common.get("activation"))
    try:
        loaded, notes = checkpoint_keys.load_sharded({"model0": model.sharded_state_dict()}, path)
        notes += checkpoint_keys.load_module_state(model, loaded["model0"])
    except SetupError:
        raise
    except upstream.load_errors() as exc:  # noqa: BLE001
        raise SetupError(f"cannot load {path}: {load_failures.describe(exc)}") from None
    if notes:
        print(checkpoint_keys.notice(path, notes), file=sys.stderr, flush=True)
    return model.float().eval(), args, common


class loaded_checkpoint:
    """`with loaded_checkpoint(dir) as (model, args, common):` — process group set up and torn down."""

    def __init__(self, load_dir, step=None):
        self.load_dir, self.step = load_dir, step

    def __enter__(self):
        _, common = read_common(self.load_dir, self.step)
        start_single_process(args_from_saved(common["args"]))
        try:
            return load_model(self.load_dir, self.step)
        except BaseException:
            stop()
            raise

    def __exit__(self, *exc):
        stop()


def save_model_checkpoint(model, args, save_dir: str, vocab_size: int, padded_vocab_size: int) -> str:
    """Write `model` as the trainer's iteration-0 checkpoint (model only: no optimizer, no RNG), which
    pretrain_gpt.py --load resumes from at any TP/PP layout. Returns the iteration directory."""
    args = SimpleNamespace(**{**vars(args), "save": save_dir, "no_save_optim": True, "no_save_rng": True,
                              "dist_ckpt_optim_fully_reshardable": False})
    ctx = SimpleNamespace(args=args, model=[model], vocab_size=vocab_size, padded_vocab_size=padded_vocab_size)
    state = SimpleNamespace(iteration=0, consumed_train_samples=0, consumed_valid_samples=0)
    return checkpointing.save_checkpoint(ctx, state)


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] logits of the whole model for token ids [b, s] (causal, positions 0..s-1)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        return model(tokens, position_ids, attention_mask=None)
