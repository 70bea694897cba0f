"""Model flags (Megatron-LM names) -> StabilityConfig -> GPTModel chunks wrapped in megatron-core DDP."""

import math

import torch
import torch.nn.functional as F

from .errors import SetupError


def add_model_args(parser):
    g = parser.add_argument_group("network size", "GPT shape (Megatron-LM flag names).")
    g.add_argument("--num-layers", type=int, default=None, help="Transformer layers (required).")
    g.add_argument("--hidden-size", type=int, default=None, help="Model width d (required).")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="Default 4 x hidden size.")
    g.add_argument("--num-attention-heads", type=int, default=None,
                   help="Attention heads (required; divisible by TP).")
    g.add_argument("--kv-channels", type=int, default=None, help="Default hidden size / heads.")
    g.add_argument("--group-query-attention", action="store_true",
                   help="Grouped-query attention (with --num-query-groups).")
    g.add_argument("--num-query-groups", type=int, default=1, help="K/V head groups under --group-query-attention.")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Default --seq-length.")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute", help="Position encoding.")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Deprecated alias of --position-embedding-type rope.")
    g.add_argument("--no-position-embedding", action="store_true",
                   help="Deprecated: no learned absolute position embedding.")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="Share of each head's dimensions rotated by RoPE.")
    g.add_argument("--rotary-base", type=int, default=10000, help="RoPE base (theta).")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this times TP.")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm",
                   help="Norm of every layer (and of Embed LN).")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of the norms.")
    g.add_argument("--apply-residual-connection-post-layernorm", action="store_true",
                   help="Post-LN residual (the paper's runs are pre-LN).")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Separate output layer instead of the word embedding table.")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP instead of GELU.")
    g.add_argument("--disable-bias-linear", action="store_true", help="No biases in the linear layers.")
    g.add_argument("--qk-layernorm", action="store_true", help="LayerNorm on queries and keys (megatron-core's).")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="Default: transformer_engine on a GPU machine that has it, else local.")
    g.add_argument("--use-mcore-models", action="store_true", help="Accepted; always true here.")

    g = parser.add_argument_group("initialization and regularization",
                                  "Megatron-LM's flags: same names, defaults and meaning.")
    g.add_argument("--init-method-std", type=float, default=None, help="Default 0.02.")
    g.add_argument("--embedding-init-method-std", type=float, default=None,
                   help="Default: --init-method-std.")
    g.add_argument("--hidden-dropout", type=float, default=0.1,
                   help="Dropout on the residual branches and the embedding output.")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on the attention probabilities.")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="Initialise full weights on CPU, then split (always on without CUDA).")

    g = parser.add_argument_group("kernels and recomputation", "Speed switches (no effect on math).")
    g.add_argument("--apply-query-key-layer-scaling", action="store_true",
                   help="Scale Q.K by the layer number (fp16 range; Megatron-LM's).")
    g.add_argument("--attention-softmax-in-fp32", action="store_true", help="Softmax in fp32 under fp16/bf16.")
    for name in ("masked-softmax", "bias-gelu", "bias-swiglu", "bias-dropout", "gradient-accumulation",
                 "persist-layer-norm"):
        suffix = "" if name == "persist-layer-norm" else "-fusion"
        g.add_argument(f"--no-{name}{suffix}", action="store_true",
                       help=f"Do not use the fused {name.replace('-', ' ')} kernel (GPU only; none run on CPU).")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="Flash attention (Transformer Engine layers on a GPU).")
    g.add_argument("--attention-backend", default="auto",
                   choices=["auto", "flash", "fused", "unfused", "local"],
                   help="Attention kernel choice (Transformer Engine; auto picks).")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Selective recomputation of attention.")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="Activation recomputation: full layers or the attention core only.")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="With full recomputation: uniform chunks or the first N layers per stage.")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="Layers per recomputation chunk (uniform) or recomputed layers (block).")
    return parser


def validate_model_args(args) -> None:
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % tp:
        raise SetupError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    if args.group_query_attention and (args.num_query_groups < 1
                                       or args.num_attention_heads % args.num_query_groups):
        raise SetupError(f"--num-query-groups {args.num_query_groups} does not divide --num-attention-heads "
                         f"{args.num_attention_heads}; give a divisor of the head count (each group shares "
                         "one key/value head)")
    if args.group_query_attention and args.num_query_groups % tp:
        raise SetupError(f"--num-query-groups {args.num_query_groups} is not divisible by TP {tp}")
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        raise SetupError(f"--hidden-size {args.hidden_size} is not divisible by "
                         f"--num-attention-heads {args.num_attention_heads}; set --kv-channels")
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.no_position_embedding and args.position_embedding_type == "learned_absolute":
        args.position_embedding_type = "none"
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.seq_length > args.max_position_embeddings:
        raise SetupError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")
    if args.transformer_impl is None:  # resolved now, so checkpoints record what was built
        from megatron_patch import capabilities

        args.transformer_impl = capabilities.default_transformer_impl()
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.recompute_granularity == "full" and args.recompute_method is None:
        raise SetupError("--recompute-granularity full needs --recompute-method uniform|block")


# The flags that shape the model or the function it computes, compared when a run resumes from a
# checkpoint (checkpointing.read_checkpoint_header). Free to change on resume: lr and schedule,
# batch sizes, intervals, logging, layout (TP/PP/DP), precision, layer implementation, dropout,
# sequence length, and init-only flags (--init-method-std, --small-init, --init-style, ...),
# which do nothing once weights are loaded. The vocabulary is checked separately (sizes).
MODEL_FLAGS = {
    # flag: effective value from a namespace of (possibly saved) args
    "--num-layers": lambda a: a.get("num_layers"),
    "--hidden-size": lambda a: a.get("hidden_size"),
    "--ffn-hidden-size": lambda a: a.get("ffn_hidden_size") or 4 * a.get("hidden_size"),
    "--num-attention-heads": lambda a: a.get("num_attention_heads"),
    "--kv-channels": lambda a: a.get("kv_channels") or a.get("hidden_size") // a.get("num_attention_heads"),
    "--num-query-groups": lambda a: (a.get("num_query_groups") if a.get("group_query_attention")
                                     else a.get("num_attention_heads")),
    "--position-embedding-type": lambda a: a.get("position_embedding_type"),
    "--max-position-embeddings": lambda a: (a.get("max_position_embeddings")
                                            if a.get("position_embedding_type") == "learned_absolute" else None),
    "--rotary-percent": lambda a: a.get("rotary_percent") if a.get("position_embedding_type") == "rope" else None,
    "--rotary-base": lambda a: a.get("rotary_base") if a.get("position_embedding_type") == "rope" else None,
    "--normalization": lambda a: a.get("normalization"),
    "--norm-epsilon": lambda a: a.get("norm_epsilon"),
    "--apply-residual-connection-post-layernorm": lambda a: bool(a.get("apply_residual_connection_post_layernorm")),
    "--untie-embeddings-and-output-weights": lambda a: bool(a.get("untie_embeddings_and_output_weights")),
    "--swiglu": lambda a: bool(a.get("swiglu")),
    "--disable-bias-linear": lambda a: bool(a.get("disable_bias_linear")),
    "--qk-layernorm": lambda a: bool(a.get("qk_layernorm")),
    "--scaled-embed": lambda a: bool(a.get("scaled_embed")),
    "--embed-layernorm": lambda a: bool(a.get("embed_layernorm")),
    "--embed-detach-alpha": lambda a: a.get("embed_detach_alpha"),
    "--wesar": lambda a: bool(a.get("wesar")),
    # The gate layout (a checkpoint saved before these flags existed had the fused QKV gate and
    # no head gate, hence the defaults of a missing key).
    "--wesar-fused-qkv-gate": lambda a: bool(a.get("wesar")) and bool(a.get("wesar_fused_qkv_gate", True)),
    "--wesar-no-output-gate": lambda a: bool(a.get("wesar") and a.get("untie_embeddings_and_output_weights")
                                             and a.get("wesar_no_output_gate", True)),
}


def model_flag_differences(saved: dict, args) -> list:
    """['--flag: checkpoint X, this run Y', ...] for every MODEL_FLAGS entry that differs."""
    given = vars(args)
    out = []
    for flag, value in MODEL_FLAGS.items():
        old, new = value(saved), value(given)
        if old != new:
            show = lambda v: ("given" if v else "not given") if isinstance(v, bool) else v  # noqa: E731
            out.append(f"{flag}: checkpoint {show(old)}, this run {show(new)}")
    return out


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by x TP."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def padded_vocab_size_on_resume(saved_padded: int, vocab_size: int, args):
    """(padded size, notice or None) for a run resuming a checkpoint padded to `saved_padded`.

    The padded size is a shape of the model, and Megatron-LM's padding depends on TP (a multiple
    of --make-vocab-size-divisible-by x TP: 8,000 ids pad to 8,064 at TP 1, 8,192 at TP 2). The
    embedding and output layer only need TP to divide it, so the checkpoint's size is kept at
    every TP size that does; any other TP size is refused, naming those that work."""
    mine = padded_vocab_size(vocab_size, args)
    tp = args.tensor_model_parallel_size
    if saved_padded == mine:
        return mine, None
    if saved_padded % tp == 0:
        return saved_padded, (f"keeping the checkpoint's padded vocabulary of {saved_padded} rows (TP {tp} divides "
                              f"it; padding for this layout alone would give {mine})")
    limit = math.gcd(saved_padded, args.num_attention_heads)
    working = [t for t in range(1, limit + 1) if limit % t == 0]
    raise SetupError(f"the checkpoint's padded vocabulary of {saved_padded} rows cannot be split over TP {tp}; "
                     f"resume at a tensor-parallel size that divides it and the {args.num_attention_heads} "
                     f"attention heads: {', '.join(map(str, working))}")


def activation_name(config) -> str:
    """The MLP activation this config computes: megatron's fused bias-GELU (on where the GPU
    kernels are) is the tanh approximation, unfused F.gelu the exact erf GELU. Saved in
    checkpoints, so evaluation and export compute what training computed on any device."""
    if config.activation_func is F.gelu:
        return "gelu_tanh" if config.bias_activation_fusion else "gelu"
    return "silu" if config.activation_func is F.silu else getattr(config.activation_func, "__name__", "custom")


def transformer_config_from_args(args, caps=None, activation=None):
    """StabilityConfig (TransformerConfig + the stabilization fields) for these flags, with the
    kernels `caps` (default: this machine's, see megatron_patch.capabilities) can run.
    `activation` (activation_name of a checkpoint) forces the GELU a saved run computed."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_patch import capabilities
    from megatron_patch.config import StabilityConfig, StabilityConfigError, stability_kwargs

    caps = caps or capabilities.current()
    on_cpu = not caps.cuda
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    fusions = capabilities.kernel_fusions(args, caps)
    if activation in ("gelu", "gelu_tanh"):
        fusions["bias_activation_fusion"] = activation == "gelu_tanh"
    impl = args.transformer_impl or capabilities.default_transformer_impl(caps)
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        apply_residual_connection_post_layernorm=args.apply_residual_connection_post_layernorm,
        add_bias_linear=not args.disable_bias_linear,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        qk_layernorm=args.qk_layernorm,
        embedding_init_method_std=args.embedding_init_method_std,
        apply_query_key_layer_scaling=args.apply_query_key_layer_scaling,
        attention_softmax_in_fp32=args.attention_softmax_in_fp32,
        **fusions,
        attention_backend=AttnBackend.flash if args.use_flash_attn else AttnBackend[args.attention_backend],
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=on_cpu or args.use_cpu_initialization,
        gradient_accumulation_fusion=capabilities.gradient_accumulation_fusion(args, impl, caps),
        deallocate_pipeline_outputs=True,
        # gloo matches p2p messages in posting order; batched p2p then swaps activations and
        # gradients under interleaved PP (facts §2.6). Unbatched is correct everywhere.
        batch_p2p_comm=(args.distributed_backend or ("gloo" if on_cpu else "nccl")) != "gloo",
    )
    if args.init_method_std is not None:
        kwargs["init_method_std"] = args.init_method_std
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("embedding_init_method_std",)}
    try:
        return StabilityConfig(**kwargs, **stability_kwargs(args))
    except (StabilityConfigError, ValueError, AssertionError) as exc:
        raise SetupError(f"model configuration: {exc}") from None


def build_gpt_chunks(args, config, vocab_size: int, device: torch.device):
    """GPTModel chunk(s) for this pipeline rank on `device`, in Float16Module for fp16/bf16; no DDP
    (the DeepSpeed engine wraps these instead, see megatron_patch/deepspeed)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    from megatron_patch.config import StabilityConfigError
    from megatron_patch.model import build_gpt_model

    vp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        try:
            model = build_gpt_model(
                config, vocab_size, args.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
                share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                position_embedding_type=args.position_embedding_type,
                parallel_output=True,
                transformer_impl=args.transformer_impl,
                rotary_percent=args.rotary_percent,
                rotary_base=args.rotary_base,
            )
        except (StabilityConfigError, ValueError) as exc:
            raise SetupError(f"model: {exc}") from None
        chunks.append(model.to(device))

    if args.fp16 or args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    return chunks


def build_model_chunks(args, config, vocab_size: int, device: torch.device):
    """GPTModel chunk(s) for this pipeline rank, wrapped in megatron-core DDP (as Megatron-LM's get_model)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    chunks = build_gpt_chunks(args, config, vocab_size, device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        # With a spike policy the monitor skips non-finite steps instead of stopping the run.
        check_for_nan_in_grad=args.check_for_nan_in_loss_and_grad and args.spike_policy == "off",
    )
    chunks = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
    if args.data_parallel_random_init:
        for chunk in chunks:
            chunk.broadcast_params()
    return chunks


def unwrap(chunk):
    """The GPTModel inside DDP (and Float16Module)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def count_parameters(chunks) -> int:
    """Parameters on this rank (shared embedding counted once)."""
    seen, total = set(), 0
    for chunk in chunks:
        for p in unwrap(chunk).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions keep the full size here
    return total
