"""--dry-run: plan a run without building it.

Prints the exact parameter count of the GPTModel that pretrain_gpt.py would build (megatron-core's
local or Transformer Engine spec: both hold the same tensors), then a per-GPU memory estimate for
the parallel layout (weights, gradients, optimizer states, activations), tokens and FLOPs per
step, and fails (exit status 1) when the estimate does not fit in --gpu-memory-gb. Nothing heavy
is built: no process group, no tensors, no data read (the tokenizer is loaded for its size).

    python -m megatron_patch.training.dry_run --world-size 8 <pretrain_gpt.py flags>
    python -m megatron_patch.training.dry_run --choose-layout --world-size 16 --gpus-per-node 8 ...

The memory estimate is an estimate: activations follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models", Table 2) generalised to any FFN/GQA shape;
the fit check keeps 10% headroom for the CUDA context, communication buffers and fragmentation.
The plan is for GPUs: flags are validated as on a CUDA machine (so --fp16/--bf16 pass on a CPU
login node).
"""

import os
import sys
from dataclasses import dataclass

from megatron_patch import capabilities

from .errors import SetupError

HEADROOM = 0.10
GB = 1e9
# The time-per-run estimate's assumptions, named where it is printed: an H100 SXM's dense bf16/fp16
# peak, and a model FLOPs utilisation at the low end of Megatron's published 41-49% on H100.
ASSUMED_PEAK_TFLOPS, ASSUMED_MFU = 989.0, 0.40


def planned_world_size(flag=None) -> int:
    if flag:
        return flag
    env = os.environ
    if env.get("WORLD_SIZE"):
        return int(env["WORLD_SIZE"])
    if env.get("GPUS_PER_NODE"):
        return int(env.get("NNODES", "1")) * int(env["GPUS_PER_NODE"])
    return 1


# ---------------------------------------------------------------- parameters (exact)
def _norm(cfg, size):
    return size * (2 if cfg.normalization == "LayerNorm" else 1)


def layer_parameters(cfg, tp: int = 1) -> int:
    """One Transformer layer's parameters on one TP rank (tp=1: the whole layer).

    Column-parallel weights and biases are split over TP; row-parallel biases and the norms are
    replicated.
    """
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    q = cfg.kv_channels * cfg.num_attention_heads
    kv = cfg.kv_channels * (cfg.num_query_groups or cfg.num_attention_heads)
    fc1_out = f * (2 if cfg.gated_linear_unit else 1)
    bias = cfg.add_bias_linear
    n = 2 * _norm(cfg, h)                                         # input and pre-MLP norms
    n += (h * (q + 2 * kv) + (q + 2 * kv) * (bias or cfg.add_qkv_bias)) // tp   # QKV
    n += q * h // tp + h * bias                                  # attention output projection
    n += (h * fc1_out + fc1_out * bias) // tp + f * h // tp + h * bias   # fc1, fc2
    n += 2 * _norm(cfg, cfg.kv_channels) if cfg.qk_layernorm else 0
    if getattr(cfg, "wesar", False):                              # WeSaR gates: Q, K, V (or QKV), proj, fc1, fc2
        n += (1 if cfg.wesar_fused_qkv_gate else 3) + 3
    return n


@dataclass
class StageParameters:
    layers: int
    embedding: int
    head: int  # final norm + output layer

    @property
    def total(self) -> int:
        return self.layers + self.embedding + self.head


def stage_parameters(args, cfg, padded_vocab: int, first: bool, last: bool, tp=None, pp=None) -> StageParameters:
    """Parameters held by one GPU of a pipeline stage (its TP shard); tp/pp default to the flags'."""
    tp = tp or args.tensor_model_parallel_size
    pp = pp or args.pipeline_model_parallel_size
    h = cfg.hidden_size
    emb = 0
    if first:
        emb = padded_vocab * h // tp
        if args.position_embedding_type == "learned_absolute":
            emb += args.max_position_embeddings * h
        if getattr(cfg, "embed_layernorm", False):
            emb += _norm(cfg, h)
    head = 0
    if last:
        head = _norm(cfg, h)
        if args.untie_embeddings_and_output_weights or pp > 1:  # PP>1 tied: the last stage's copy
            head += padded_vocab * h // tp
        if args.untie_embeddings_and_output_weights and getattr(cfg, "wesar", False) \
                and cfg.wesar_gate_output_layer:
            head += 1                                               # the head's WeSaR gate
    layers = cfg.num_layers // pp * layer_parameters(cfg, tp)
    return StageParameters(layers, emb, head)


def total_parameters(args, cfg, padded_vocab: int) -> int:
    """The whole model's parameters (one stage, no TP split), a tied output layer counted once."""
    return stage_parameters(args, cfg, padded_vocab, True, True, tp=1, pp=1).total


# ---------------------------------------------------------------- memory (estimate)
def _quadratic_attention_stored(args) -> bool:
    """Does the attention keep its [s x s] scores for backward? Local DotProductAttention does;
    Transformer Engine's flash/fused attention and selective recomputation do not."""
    if args.recompute_granularity == "selective":
        return False
    if args.transformer_impl == "local" or args.attention_backend in ("unfused", "local"):
        return True
    return args.transformer_impl is None and not capabilities.current().transformer_engine


def layer_activation_bytes(args, cfg) -> float:
    """Activations one layer keeps for backward, per micro-batch, on one GPU."""
    s, b, h, t = args.seq_length, args.micro_batch_size, cfg.hidden_size, args.tensor_model_parallel_size
    a, f = cfg.num_attention_heads, cfg.ffn_hidden_size
    q = cfg.kv_channels * a
    kv = cfg.kv_channels * (cfg.num_query_groups or a)
    scale = 1.0 if (args.fp16 or args.bf16) else 2.0  # Korthikanti's counts are for 16-bit
    if args.recompute_granularity == "full":  # only each layer's input is kept
        return scale * 2 * s * b * h / (t if args.sequence_parallel else 1)
    # Not split by TP unless sequence parallel: 2 LN inputs, QKV/fc1 inputs, 2 dropout masks.
    replicated = (4 + 2 + 1 + 2 + 1) * s * b * h
    fc1_out = f * (2 if cfg.gated_linear_unit else 1)
    split = 2 * s * b * (q + 2 * kv) + 2 * s * b * q + 2 * s * b * fc1_out + 2 * s * b * f
    if _quadratic_attention_stored(args):
        split += 5 * a * s * s * b
    replicated = replicated / t if args.sequence_parallel else replicated
    return scale * (replicated + split / t)


@dataclass
class MemoryPlan:
    stage: str
    parameters: int
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def stage_memory(args, cfg, padded_vocab: int, first: bool, last: bool) -> MemoryPlan:
    params = stage_parameters(args, cfg, padded_vocab, first, last).total
    half = args.fp16 or args.bf16
    weight_bytes = 2 if half else 4
    grad_bytes = 4 if (not half or args.accumulate_allreduce_grads_in_fp32) else 2
    state_bytes = 8 if args.optimizer == "adam" else 4          # Adam m and v / SGD momentum
    state_bytes += 4 if half else 0                              # fp32 main copy of the weights
    shards = args.data_parallel_size if args.use_distributed_optimizer else 1
    # Activations: 1F1B keeps min(PP, micro-batches) in flight on the first stage, one on the last.
    pp, vp, nmb = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size, args.num_microbatches
    in_flight = min(pp, nmb) if first else 1
    if first and vp:
        in_flight *= 1 + (pp - 1) / (pp * vp)
    act = cfg.num_layers // pp * layer_activation_bytes(args, cfg) * in_flight
    s, b, t = args.seq_length, args.micro_batch_size, args.tensor_model_parallel_size
    if first:  # embedding output and its dropout mask
        act += in_flight * (weight_bytes + 1) * s * b * cfg.hidden_size / (t if args.sequence_parallel else 1)
    if last:  # logits (model dtype) and the fp32 softmax of the vocab-parallel cross-entropy
        act += (weight_bytes + 4) * s * b * padded_vocab / t
    stage = "all" if first and last else "first" if first else "last"
    return MemoryPlan(stage, params, params * weight_bytes, params * grad_bytes,
                      params * state_bytes / shards, act)


def memory_plan(args, cfg, padded_vocab: int) -> MemoryPlan:
    """The GPU that needs the most memory (first or last pipeline stage)."""
    if args.pipeline_model_parallel_size == 1:
        return stage_memory(args, cfg, padded_vocab, True, True)
    plans = [stage_memory(args, cfg, padded_vocab, True, False),
             stage_memory(args, cfg, padded_vocab, False, True)]
    return max(plans, key=lambda p: p.total)


def fits(plan: MemoryPlan, gpu_memory_gb: float) -> bool:
    return plan.total * (1 + HEADROOM) <= gpu_memory_gb * GB


# ---------------------------------------------------------------- report
def _vocab_size(args) -> int:
    from .data import build_tokenizer

    return build_tokenizer(args).vocab_size


def days_per_run(args, flops_per_step: float) -> float:
    """--train-iters steps at ASSUMED_MFU of ASSUMED_PEAK_TFLOPS on every GPU, in days."""
    per_second = args.world_size * ASSUMED_PEAK_TFLOPS * 1e12 * ASSUMED_MFU
    return args.train_iters * flops_per_step / per_second / 86400


def plan(args) -> dict:
    """Everything the report prints, as numbers (for tests and the layout chooser)."""
    from .logging import training_flops_per_token
    from .model_builder import padded_vocab_size

    cfg = args.transformer_config
    padded = padded_vocab_size(_vocab_size(args), args)
    mem = memory_plan(args, cfg, padded)
    tokens = args.global_batch_size * args.seq_length
    return dict(parameters=total_parameters(args, cfg, padded), padded_vocab=padded, memory=mem,
                tokens_per_step=tokens, flops_per_step=training_flops_per_token(args, padded) * tokens,
                fits=fits(mem, args.gpu_memory_gb))


def layout_line(args) -> str:
    vp = f" (VP {args.virtual_pipeline_model_parallel_size})" if args.virtual_pipeline_model_parallel_size else ""
    return (f"world {args.world_size} = TP {args.tensor_model_parallel_size} x PP "
            f"{args.pipeline_model_parallel_size} x DP {args.data_parallel_size}"
            f"{vp}; "
            f"micro-batch {args.micro_batch_size}, global batch {args.global_batch_size} "
            f"({args.num_microbatches} micro-batches per step); sequence parallel "
            f"{'on' if args.sequence_parallel else 'off'}; distributed optimizer "
            f"{'on' if args.use_distributed_optimizer else 'off'}")


def run_dry_run(args) -> int:
    """Print the plan for pretrain_gpt.py's parsed and validated args. 0 if it fits, else 1."""
    p = plan(args)
    mem, cfg = p["memory"], args.transformer_config
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    print(f"dry run: GPT {cfg.num_layers} layers x hidden {cfg.hidden_size} x {cfg.num_attention_heads} heads, "
          f"seq {args.seq_length}, vocab padded to {p['padded_vocab']}, {precision}; nothing built")
    print(f"layout: {layout_line(args)}")
    print(f"parameters: {p['parameters']}")
    where = ("no pipeline: every layer" if mem.stage == "all"
             else f"on the {mem.stage} pipeline stage, the larger in memory")
    print(f"parameters per GPU: {mem.parameters} ({where})")
    print(f"memory per GPU (GB, estimate): weights {mem.weights / GB:.2f} | grads {mem.grads / GB:.2f} | "
          f"optimizer {mem.optimizer / GB:.2f} | activations {mem.activations / GB:.2f} | "
          f"total {mem.total / GB:.2f} (+{HEADROOM:.0%} headroom) of {args.gpu_memory_gb:g}")
    print(f"tokens per step: {p['tokens_per_step']}")
    print(f"FLOPs per step: {p['flops_per_step']:.4g} ({p['flops_per_step'] / args.world_size:.4g} per GPU; "
          f"model FLOPs, 3 x forward, no recomputation)")
    tokens = args.train_iters * p["tokens_per_step"]
    print(f"time per run: {days_per_run(args, p['flops_per_step']):.1f} days for {args.train_iters} steps "
          f"({tokens:.3g} tokens), assuming {ASSUMED_MFU:.0%} MFU of an H100's {ASSUMED_PEAK_TFLOPS:g} "
          f"dense fp16/bf16 TFLOP/s on each of {args.world_size} GPUs (not measured)")
    if not p["fits"]:
        print(f"dry run: error: needs {mem.total * (1 + HEADROOM) / GB:.1f} GB per GPU with headroom, "
              f"more than --gpu-memory-gb {args.gpu_memory_gb:g}: use more tensor/pipeline parallelism, "
              "--use-distributed-optimizer, a smaller --micro-batch-size or recomputation",
              file=sys.stderr, flush=True)
        return 1
    return 0


# ---------------------------------------------------------------- layout chooser
def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_layout(argv, world_size: int, gpus_per_node: int, max_micro_batch: int = 8):
    """TP, PP and micro-batch size for `world_size` GPUs: the least model parallelism (TP within a
    node before PP), then the largest micro-batch (up to `max_micro_batch`) that fits. Returns
    (extra flags, validated args); raises SetupError naming the closest miss if nothing fits."""
    base = build_parser().parse_args(list(argv))
    heads, layers, gbs = base.num_attention_heads, base.num_layers, base.global_batch_size
    if None in (heads, layers, gbs):
        raise SetupError("--choose-layout needs --num-attention-heads, --num-layers and --global-batch-size")
    candidates = sorted(((tp, pp) for tp in _divisors(gpus_per_node) for pp in _divisors(layers)
                         if heads % tp == 0 and world_size % (tp * pp) == 0), key=lambda c: (c[0] * c[1], c[1]))
    closest = None
    for tp, pp in candidates:
        dp = world_size // (tp * pp)
        if gbs % dp:
            continue
        per_rank = gbs // dp
        for mbs in sorted((m for m in _divisors(per_rank) if m <= max_micro_batch), reverse=True):
            if pp > 1 and per_rank // mbs < pp and mbs > 1:
                continue  # keep the pipeline fed: at least PP micro-batches per step
            flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                     "--micro-batch-size", str(mbs)] + (["--sequence-parallel"] if tp > 1 else [])
            args = parse_for_plan(list(argv) + flags, world_size)
            p = plan(args)
            if p["fits"]:
                return flags, args
            if closest is None or p["memory"].total < closest[1]:
                closest = (f"TP {tp} x PP {pp}, micro-batch {mbs}", p["memory"].total)
    if closest is None:
        raise SetupError(f"no layout of {world_size} GPUs gives a data-parallel size that divides "
                         f"--global-batch-size {gbs}; use a world size that does")
    raise SetupError(f"no layout of {world_size} GPUs fits in {base.gpu_memory_gb:g} GB per GPU; the "
                     f"smallest ({closest[0]}) needs {closest[1] * (1 + HEADROOM) / GB:.1f} GB with headroom")


# ---------------------------------------------------------------- command line
def _as_on_cuda():
    """Validate flags as the GPU cluster will: this machine's packages, on a CUDA device."""
    return capabilities.use(capabilities.as_on_cuda())


def build_parser():
    from .arguments import build_parser as trainer_parser

    parser = trainer_parser(prog="python -m megatron_patch.training.dry_run")  # has --dry-run's flags
    g = parser.add_argument_group("layout chooser")
    g.add_argument("--choose-layout", action="store_true",
                   help="Choose TP/PP/micro-batch for --world-size GPUs, print the report, and the "
                        "chosen flags on the last line as 'layout flags: ...'.")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="Largest tensor-parallel size (default GPUS_PER_NODE, else 8).")
    return parser


def parse_for_plan(argv, world_size: int):
    from .arguments import validate_args

    args = build_parser().parse_args(list(argv))
    with _as_on_cuda():
        return validate_args(args, world_size)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        pre = build_parser().parse_args(argv)
        world_size = planned_world_size(pre.dry_run_world_size)
        if pre.choose_layout:
            gpus = pre.gpus_per_node or int(os.environ.get("GPUS_PER_NODE", "8"))
            flags, args = choose_layout(argv, world_size, gpus)
            status = run_dry_run(args)
            print("layout flags: " + " ".join(flags), flush=True)
            return status
        return run_dry_run(parse_for_plan(argv, world_size))
    except SetupError as exc:
        print(f"dry run: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    sys.exit(main())
