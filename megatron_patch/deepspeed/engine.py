"""DeepSpeed's engine over the megatron_patch GPTModel: build it, one training step, evaluation.

What is shared with the Megatron path, so that the two give the same losses: the model (built by
the trainer's model builder after the same seeding, so the same weights), the micro-batches
(training.data's iterators: same samples per data-parallel rank), the loss (training.loop's
forward_step and loss_func: per-micro-batch token mean, averaged over micro-batches and DP ranks),
megatron-core's parameter groups (bias / 1-D / WeSaR-gate / --no-embedding-weight-decay
exclusions) in torch's AdamW (the class megatron-core uses without apex/TE), and megatron-core's
OptimizerParamScheduler, stepped after every applied update. DeepSpeed does the rest: gradient
accumulation, the all-reduce or ZeRO partitioning over the data-parallel group, gradient clipping,
fp16/bf16 and loss scaling.
"""

import contextlib
import os
import warnings

import torch

from megatron_patch.training.errors import SetupError


def import_deepspeed():
    """deepspeed, with its accelerator chosen like the trainer's device unless DS_ACCELERATOR is
    set: cuda with a GPU, else cpu. DeepSpeed's CPU accelerator runs its collectives on the gloo
    process group the trainer has already started (it would pick oneccl only if
    oneccl_bindings_for_pytorch were installed), and setting it skips DeepSpeed's device probing.

    On CPU, DeepSpeed's communication backend would also JIT-compile a shared-memory all-reduce
    kernel when it starts (88 s of g++ CPU time here, and a compiler on the machine) that
    only its inference all-reduce uses; training collectives go through torch.distributed either
    way. It is marked unavailable in DeepSpeed's table of compatible ops (a dict DeepSpeed keeps
    for edits like this; it does the same itself off Linux)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # torch 2.13 renamed two collectives DeepSpeed 0.19.8 calls; it warns again and again.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                    r"is deprecated")
    import deepspeed
    import deepspeed.ops

    if deepspeed.accelerator.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class ParallelStateMPU:
    """megatron-core's parallel_state in the `mpu` shape DeepSpeed asks for (Megatron-LM's API).

    With PP = 1 (--deepspeed refuses more) model parallelism is tensor parallelism: DeepSpeed
    partitions and reduces over the data-parallel group only, and counts TP-replicated parameters
    once in the gradient norm (megatron-core marks split ones `tensor_model_parallel`). Groups are
    looked up on every call, since the trainer rebuilds them for each run."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return torch.distributed.get_process_group_ranks(self.get_data_parallel_group())


class EngineOptimizer:
    """What the training loop, the logger and callbacks read from ctx.optimizer: the parameter
    groups the scheduler drives (lr, weight decay), the loss scale of DeepSpeed's wrapper, and the
    gradient access the stability monitor needs (megatron_patch.monitor.grad_stats)."""

    def __init__(self, engine, optimizer):
        self.engine, self.optimizer = engine, optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def get_loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0))

    def _partitioned(self) -> bool:
        """Does each DP rank hold only a partition of the gradients? Under ZeRO 1-3, and with
        DeepSpeed's bf16 optimizer (which partitions its fp32 state like ZeRO-1)."""
        return self.engine.zero_optimization_stage() > 0 or type(self.engine.optimizer).__name__ == "BF16_Optimizer"

    def owned_gradient(self, param):
        """The part of `param`'s reduced gradient this rank holds, between the last backward of a
        step and the engine's step, read through DeepSpeed's own fragment mappings (those that
        deepspeed.utils.safe_get_full_grad assembles, without its all-reduce): all of it when not
        partitioned, else this rank's fragment (None if it holds none). fp16: still loss-scaled."""
        if self.engine.zero_optimization_stage() == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(param)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).flatten()
            address = mapping.lp_fragment_address
            if fragment.numel() != address.numel:  # the bf16 optimizer keeps the whole gradient
                fragment = fragment.narrow(0, address.start, address.numel)
            return fragment
        return None if self._partitioned() else param.grad

    def get_grad_stats_parallel_group(self):
        """Per-rank gradient sums add up over the model-parallel group when every DP rank holds
        the whole gradient, over every rank when each holds a disjoint partition."""
        from megatron.core import parallel_state

        if not self._partitioned():
            return parallel_state.get_model_parallel_group()
        return None  # the world: DeepSpeed runs PP = 1, so world = DP x TP

    @contextlib.contextmanager
    def update_vetoed(self):
        """Run the engine's step without changing a weight: torch's Adam does nothing this once.
        DeepSpeed still does its bookkeeping around it (clipping, zeroing the gradients, copying
        the unchanged fp32 partitions back to the model, advancing its step counter); Adam's
        moments and step count stay as they were, as on the Megatron engine's skipped steps."""
        self.optimizer.step = lambda *args, **kwargs: None
        try:
            yield
        finally:
            del self.optimizer.step


def build_engine(args, config, padded_vocab_size, device):
    """([engine], EngineOptimizer, OptimizerParamScheduler) for training.pretrain.build."""
    from megatron.core.optimizer import _get_param_groups  # get_megatron_optimizer's own grouping

    from megatron_patch.optim import param_group_overrides
    from megatron_patch.training import model_builder
    from megatron_patch.training.optimizer import build_scheduler, optimizer_config_from_args

    deepspeed = import_deepspeed()
    (model,) = model_builder.build_gpt_chunks(args, config, padded_vocab_size, device)
    opt_config = optimizer_config_from_args(args)
    groups = _get_param_groups([model], opt_config,
                               param_group_overrides(opt_config, args.no_embedding_weight_decay))
    adam = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    scheduler = build_scheduler(args, adam)  # sets the iteration-0 lr and weight decay per group
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank or 0))  # DeepSpeed asserts it; unset without a launcher
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adam, mpu=ParallelStateMPU(),
                                               config=args.deepspeed_config_dict, dist_init_required=False)
    except (AssertionError, ValueError) as exc:  # DeepSpeed's own config checks (pydantic: several lines)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "pydantic.dev" not in line]
        raise SetupError(f"--deepspeed-config {args.deepspeed_config}: {'; '.join(lines)}") from None
    if torch.distributed.get_rank() == 0:
        precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
        print(f" > DeepSpeed {deepspeed.__version__} engine: ZeRO stage {args.zero_stage}, {precision}, "
              f"{args.num_microbatches} micro-batch(es) of {args.micro_batch_size} per step", flush=True)
    return [engine], EngineOptimizer(engine, adam), scheduler


def loop_functions(ctx) -> dict:
    """training.loop.train's step_fn/eval_fn for the engine."""
    return {"step_fn": train_step, "eval_fn": evaluate}


def _micro_batch(engine, iterator):
    """Forward one micro-batch; (loss to back-propagate, {"lm loss": [token sum, tokens]})."""
    from megatron_patch.training.loop import forward_step

    output, loss_func = forward_step(iterator, engine)
    loss, num_tokens, report = loss_func(output)
    return loss / max(int(num_tokens), 1), report


def train_step(ctx, state, iterators):
    """One global batch: backward per micro-batch, DeepSpeed's update at the accumulation boundary,
    then the lr schedule (as on the Megatron path, a skipped update does not advance it). Between
    the last backward and that update, callbacks may veto it (the stability monitor's skip), as
    on the Megatron path; see EngineOptimizer.update_vetoed."""
    from megatron_patch.training.callbacks import StepState
    from megatron_patch.training.loop import SKIP_MONITOR, SKIP_OVERFLOW, _loss_on_all_ranks, _reduce_loss

    engine, args = ctx.model[0], ctx.args
    reports, vetoed = [], False
    for micro in range(args.num_microbatches):
        loss, report = _micro_batch(engine, iterators[0])
        engine.backward(loss)  # scaled by 1 / gradient_accumulation_steps inside
        reports.append(report)
        if micro == args.num_microbatches - 1 and ctx.callbacks:
            mean = _loss_on_all_ranks(_reduce_loss(reports), ctx.runtime.device)
            vetoed = ctx.callbacks.on_before_optimizer_step(
                StepState(state.iteration + 1, ctx.model, ctx.optimizer, args, loss=mean))
        with ctx.optimizer.update_vetoed() if vetoed else contextlib.nullcontext():
            engine.step()  # a no-op until the last micro-batch
    ctx.z_loss = _reduce_loss(reports, "z loss")  # None with the z-loss off
    if vetoed:
        return _reduce_loss(reports), None, SKIP_MONITOR
    applied = engine.was_step_applied()
    if applied:
        ctx.scheduler.step(increment=args.global_batch_size)
    grad_norm = engine.get_global_grad_norm()
    return (_reduce_loss(reports), None if grad_norm is None else float(grad_norm),
            None if applied else SKIP_OVERFLOW)  # DeepSpeed itself skips only fp16 overflows


def evaluate(ctx, iterators, num_batches):
    """Mean validation loss over `num_batches` global batches, as training.loop.evaluate."""
    from megatron_patch.training.loop import _reduce_loss

    engine = ctx.model[0]
    engine.eval()
    with torch.no_grad():
        reports = [_micro_batch(engine, iterators[0])[1]
                   for _ in range(num_batches * ctx.args.num_microbatches)]
    engine.train()
    return _reduce_loss(reports)
