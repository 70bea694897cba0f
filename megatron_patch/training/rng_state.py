"""RNG states in checkpoints: what is saved, and how it is restored, also across device types.

Saved: python's, numpy's and torch's CPU generator (the host streams), torch.cuda's and
megatron's RNG tracker (the device streams: the tracker forks dropout per TP rank), and the
device type they came from. Restored: the host streams always; the device streams only when
saved on this device type, since a CPU generator state is no CUDA one, nor the reverse; else the
tracker is reseeded from the run's seed as at start-up, with a notice.
"""

import random

import numpy as np
import torch


def device() -> str:
    """Where the device RNG states (torch.cuda's, megatron's tracker) live in this process."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def capture() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states(), "device": device()}


def restore(state, seed: int, data_parallel_random_init: bool):
    """Restore `state` (module doc); returns a notice when the device streams were reseeded."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    saved_device = state.get("device") or ("cpu" if state["cuda"] is None else "cuda")
    if saved_device != device():
        from .initialize import seed_device_rng

        seed_device_rng(seed, data_parallel_random_init)
        return (f"RNG states were saved on {saved_device}, this run is on {device()}: device RNG "
                f"(dropout) reseeded from --seed {seed}; host RNG restored")
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    return None


def sharded(per_dp_rank):
    """One RNG state per (PP, TP) rank, shared by DP replicas; per DP rank too when the ranks'
    streams differ (--data-parallel-random-init seeds each DP rank differently)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()]
    offset = [ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()]
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if per_dp_rank:
        shape.append(ps.get_data_parallel_world_size(with_context_parallel=True))
        offset.append(dp_rank)
    return ShardedObject("rng_state", capture(), tuple(shape), tuple(offset),
                         replica_id=0 if per_dp_rank else dp_rank)
