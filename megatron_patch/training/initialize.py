"""Process groups, model-parallel state and seeds: nccl on CUDA, gloo + compat.cpu on CPU.

The same code runs on both: the only CPU-specific call is `megatron_patch.compat.cpu.enable()`,
made here when CUDA is absent. Launch with torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the
environment) or as one plain process.
"""

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import SetupError


def add_distributed_args(parser):
    g = parser.add_argument_group("distributed", "Parallel layout and process groups.")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size (TP).")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size (PP).")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Interleaved 1F1B: layers per virtual stage (needs PP > 1).")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="Interleaved 1F1B: virtual stages per pipeline rank.")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Split LayerNorm/dropout activations along the sequence over TP ranks.")
    g.add_argument("--context-parallel-size", type=int, default=1, help="Only 1 is supported.")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="Default: nccl with CUDA, gloo without (CPU).")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="How long a collective may wait for a peer before the run fails.")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="Set by old launchers; torchrun's LOCAL_RANK is used otherwise.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard optimizer state over data-parallel ranks (ZeRO-1).")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="Overlap the gradient all-reduce/reduce-scatter with the backward pass.")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="Overlap the distributed optimizer's parameter all-gather with the forward.")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="Keep and reduce gradients in fp32 (on by default with --bf16).")
    g.add_argument("--seed", type=int, default=1234, help="Random seed (python, numpy, torch).")
    g.add_argument("--data-parallel-random-init", action="store_true",
                   help="Different model init per data-parallel rank (then broadcast).")
    return parser


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_distributed_args(args, world_size: int) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise SetupError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world_size % (tp * pp):
        raise SetupError(f"world size {world_size} is not divisible by TP ({tp}) x PP ({pp})")
    args.data_parallel_size = world_size // (tp * pp)
    if args.context_parallel_size != 1:
        raise SetupError("--context-parallel-size > 1 is not supported by this trainer")
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split over
    if args.num_layers_per_virtual_pipeline_stage is not None:
        if args.virtual_pipeline_model_parallel_size is not None:
            raise SetupError("give --num-layers-per-virtual-pipeline-stage or "
                             "--virtual-pipeline-model-parallel-size, not both")
        per_rank, rem = divmod(args.num_layers, pp)
        if rem or per_rank % args.num_layers_per_virtual_pipeline_stage:
            raise SetupError(f"--num-layers {args.num_layers} does not split into PP={pp} ranks of "
                             f"{args.num_layers_per_virtual_pipeline_stage}-layer virtual stages")
        args.virtual_pipeline_model_parallel_size = per_rank // args.num_layers_per_virtual_pipeline_stage
    vp = args.virtual_pipeline_model_parallel_size
    if vp is not None:
        if pp == 1:
            raise SetupError("virtual pipeline stages need --pipeline-model-parallel-size > 1")
        if args.num_layers % (pp * vp):
            raise SetupError(f"--num-layers {args.num_layers} is not divisible by PP x VP = {pp * vp}")
        if vp == 1:
            args.virtual_pipeline_model_parallel_size = None
    elif args.num_layers % pp:
        raise SetupError(f"--num-layers {args.num_layers} is not divisible by "
                         f"--pipeline-model-parallel-size {pp}")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise SetupError("--overlap-param-gather needs --use-distributed-optimizer")


@dataclass
class Runtime:
    """Where this process runs."""

    device: torch.device
    backend: str
    rank: int
    world_size: int

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


def initialize_distributed(args) -> Runtime:
    """Start torch.distributed (once per process) and megatron-core's parallel_state."""
    from megatron.core import parallel_state

    from megatron_patch import capabilities

    use_cuda = torch.cuda.is_available()
    backend = args.distributed_backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise SetupError("--distributed-backend nccl needs CUDA; drop it to use gloo on CPU")
    notices = []
    if use_cuda:
        # Before torch.cuda.set_device, which creates the CUDA context that reads it.
        notices.append(capabilities.set_device_max_connections(args))
        local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_patch.compat import cpu

        cpu.enable()
        device = torch.device("cpu")

    if torch.distributed.is_initialized() and torch.distributed.get_backend() != backend:
        if torch.distributed.get_world_size() > 1:
            raise SetupError(f"torch.distributed already runs {torch.distributed.get_backend()}, "
                             f"this run needs {backend}")
        torch.distributed.destroy_process_group()  # e.g. a gloo group left by CPU tests
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
        if "RANK" in os.environ:
            torch.distributed.init_process_group(backend, timeout=timeout)
        else:  # one plain process, no launcher
            torch.distributed.init_process_group(
                backend, store=torch.distributed.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world_size != getattr(args, "world_size", world_size):
        raise SetupError(f"flags were checked for world size {args.world_size}, but it is {world_size}")

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    set_random_seed(args.seed, args.data_parallel_random_init)
    if rank == 0:
        notes = list(getattr(args, "precision_notes", [])) + list(getattr(args, "checkpoint_notes", []))
        for notice in notices + notes:
            if notice:
                print(f" > {notice}", flush=True)
    return Runtime(device=device, backend=backend, rank=rank, world_size=world_size)


def _offset_seed(seed: int, data_parallel_random_init: bool) -> int:
    """Megatron-LM's per-rank seed: offset per pipeline stage (and DP rank if asked)."""
    from megatron.core import parallel_state

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * parallel_state.get_data_parallel_rank()
    return seed


def set_random_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Megatron-LM's seeding: python, numpy, torch and the device streams (TP via the tracker)."""
    offset = _offset_seed(seed, data_parallel_random_init)
    random.seed(offset)
    np.random.seed(offset)
    torch.manual_seed(offset)
    seed_device_rng(seed, data_parallel_random_init)


def seed_device_rng(seed: int, data_parallel_random_init: bool = False) -> None:
    """The device streams alone: torch.cuda's and megatron's RNG tracker (dropout per TP rank)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(_offset_seed(seed, data_parallel_random_init))


def init_single_process(seed: int = 1234) -> None:
    """One process without a launcher (tools, benchmarks, tests): gloo world of 1 on an in-memory
    store, parallel_state TP=PP=1, megatron's RNG tracker seeded; CPU compat where no CUDA."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from megatron_patch.compat import cpu

        cpu.enable()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)


def teardown() -> None:
    """Undo parallel_state and free its process groups; the default group stays, so a process
    can train again (tests do). megatron-core's destroy_model_parallel only drops its references:
    each gloo subgroup keeps ~3 threads alive, some busy-polling, so a process that re-initialises
    many times (a test session) would pile up thousands of spinning threads without this."""
    import torch.distributed.distributed_c10d as c10d
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        world = c10d.GroupMember.WORLD
        for group in list(getattr(c10d._world, "pg_map", {})):  # private: no public list of groups
            if group is not world:
                torch.distributed.destroy_process_group(group)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
