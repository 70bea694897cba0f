"""Run unmodified megatron-core (0.16.1 .. 0.19.x) on CPU (gloo), the same code path as on GPU.

megatron-core assumes CUDA in a handful of places. This module is the single place where we
answer those places on a machine without CUDA. It does nothing unless `enable()` is called, and
`enable()` refuses to run where CUDA is available, so GPU runs are never touched.

What asks for CUDA, and the answer given here (paths relative to `megatron/core/`):
1. RNG (`tensor_parallel/random.py`): the tracker saves/restores `torch.cuda` RNG states. We
   install `CpuRNGStatesTracker`, which forks the CPU default generator instead; upstream's
   `model_parallel_cuda_manual_seed` then seeds it unmodified.
2. `torch.cuda.current_device()` (GlobalMemoryBuffer in `utils.py`, sequence-parallel mappings,
   p2p, distributed optimizer) and `torch.cuda.synchronize()` (p2p): answered with "cpu" / no-op.
3. Factory calls with `device="cuda"` (schedules' `total_num_tokens`, optimizer scalars, clip
   grads), `Tensor.cuda()`, `Tensor.to("cuda")` and the `Tensor.type()` string checks in the
   optimizer: handled by `CudaToCpuMode`, a torch function mode that stays entered.
4. `torch.cuda.current_stream()`: 0.17 onwards call it in `distributed/param_and_grad_buffer.py`
   `start_grad_sync` on every gradient sync (to wait for CUDA-graph weight-gradient events), which
   dies with "Found no NVIDIA driver" on CPU. Answered with `CpuStream`, whose waits are no-ops: CPU
   work runs in program order, so there is nothing to wait for.
Differences between megatron-core releases that are not CPU-specific: megatron_patch/upstream.py.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from megatron.core.tensor_parallel import random as mcore_random

_ENABLED = False
_MODE = None


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's named RNG states (data-parallel, tensor-parallel, expert) on the CPU generator."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


class CpuStream:
    """What `torch.cuda.current_stream()` answers on CPU: one in-order stream, so waits are no-ops."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_CPU_STREAM = CpuStream()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device requests to CPU; reports CPU tensors under their CUDA type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def enable() -> None:
    """Install the CPU answers. Idempotent. Raises if CUDA is available (use the GPU path)."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_patch.compat.cpu.enable() is for machines without CUDA")
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True


def is_enabled() -> bool:
    return _ENABLED
