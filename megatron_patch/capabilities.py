"""What this machine can do, decided once, and the GPU choices that follow from it.

Every question of the form "is Transformer Engine / apex / a fused kernel / CUDA here, and what
do we do about it" is answered in this module and read everywhere else (model builder, trainer
flags, dry run, export). Probing in several places drifts apart: `megatron.core.extensions.
transformer_engine` imports even without Transformer Engine (upstream puts a MagicMock in its
place), so "can I import the extension" is not a TE check. Upstream's own flags, which import
the real packages, are.

Tests hand in a fake `Capabilities` with `use(...)`, which is how the GPU branches of the
decisions below get CPU tests.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import os
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class Capabilities:
    cuda: bool
    transformer_engine: bool  # the transformer_engine package itself imports
    apex: bool  # NVIDIA apex (FusedLayerNorm); the PyPI package named apex is another project
    fused_wgrad: bool  # apex's fused_weight_gradient_mlp_cuda (wgrad accumulation into main_grad)
    masked_softmax: bool  # megatron's scaled_masked_softmax_cuda kernel
    arch_major: Optional[int] = None  # CUDA compute capability major of the current device

    def describe(self) -> str:
        found = [name for name, on in (("cuda", self.cuda), ("transformer_engine", self.transformer_engine),
                                       ("apex", self.apex), ("fused_wgrad", self.fused_wgrad),
                                       ("masked_softmax", self.masked_softmax)) if on]
        arch = f", sm_{self.arch_major}x" if self.arch_major is not None else ""
        return (", ".join(found) or "cpu only") + arch


@functools.lru_cache(maxsize=1)
def detect() -> Capabilities:
    """This machine's capabilities (cached: packages do not appear during a run)."""
    # Upstream's own detection: these flags are set by importing transformer_engine / apex.
    from megatron.core.models.gpt.gpt_layer_specs import HAVE_APEX, HAVE_TE

    cuda = torch.cuda.is_available()
    arch = None
    if cuda:
        # Device properties need no CUDA context, so CUDA_DEVICE_MAX_CONNECTIONS can still be set.
        arch = torch.cuda.get_device_capability()[0]
    return Capabilities(
        cuda=cuda,
        transformer_engine=bool(HAVE_TE),
        apex=bool(HAVE_APEX),
        fused_wgrad=importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
        masked_softmax=importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        arch_major=arch,
    )


_OVERRIDE: Optional[Capabilities] = None


def current() -> Capabilities:
    """The capabilities decisions are made for: `use()`'s while one is active, else `detect()`'s."""
    return _OVERRIDE if _OVERRIDE is not None else detect()


def on_cuda() -> bool:
    """`current().cuda` without the package probes of `detect()` (they import megatron-core,
    seconds of start-up that a flag check should not pay)."""
    return _OVERRIDE.cuda if _OVERRIDE is not None else torch.cuda.is_available()


@contextlib.contextmanager
def use(caps: Capabilities):
    """Decide as if the machine had `caps` (tests; the dry run plans as on the GPU cluster)."""
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, caps
    try:
        yield caps
    finally:
        _OVERRIDE = previous


def as_on_cuda() -> Capabilities:
    """This machine's packages, on a CUDA device (what the dry run validates flags against)."""
    caps = current()
    return caps if caps.cuda else dataclasses.replace(caps, cuda=True)


def deepspeed_precision_problem(precision: str) -> Optional[str]:
    """Why DeepSpeed cannot train in `precision` ("fp16" or "bf16") on this machine, or None.
    DeepSpeed's engine refuses, deep in its start-up, a dtype its accelerator does not list. Its CPU
    accelerator lists fp16 only where oneDNN has fp16 kernels (CPUs with avx512_fp16 or AMX-FP16,
    e.g. Intel Sapphire Rapids; not AMD EPYC Zen 4), and bf16 everywhere. Imports DeepSpeed: ask
    only when --deepspeed is given."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dtype in accelerator.supported_dtypes():
        return None
    device = accelerator.device_name()
    hint = " (oneDNN has no fp16 kernels for this CPU: it needs avx512_fp16 or AMX-FP16)" if device == "cpu" else ""
    return (f"--{precision} with --deepspeed: DeepSpeed's {device} accelerator does not support {precision} "
            f"here{hint}; use --bf16, or drop --deepspeed (megatron-core's engine trains --{precision} on any machine)")


# ---------------------------------------------------------------- decisions
def default_transformer_impl(caps: Optional[Capabilities] = None) -> str:
    """Transformer Engine's layers on a GPU machine that has them, else megatron-core's local ones."""
    caps = caps or current()
    return "transformer_engine" if caps.cuda and caps.transformer_engine else "local"


def check_transformer_impl(impl: str, caps: Optional[Capabilities] = None) -> Optional[str]:
    """Why `impl` cannot be built here (one line), or None."""
    caps = caps or current()
    if impl == "transformer_engine" and not caps.transformer_engine:
        return ("--transformer-impl transformer_engine needs Transformer Engine installed "
                "(NGC PyTorch image or pip install transformer_engine[pytorch]); use --transformer-impl local")
    return None


def kernel_fusions(args, caps: Optional[Capabilities] = None) -> dict:
    """Megatron-LM's fusions (on by default there) where this machine can run them: never on
    CPU; on GPU only with the kernels they need (the megatron-core wheel ships none of them)."""
    caps = caps or current()
    gpu = caps.cuda
    return dict(
        masked_softmax_fusion=gpu and caps.masked_softmax and not args.no_masked_softmax_fusion,
        bias_activation_fusion=gpu and (args.swiglu or not args.disable_bias_linear)
        and not (args.no_bias_swiglu_fusion if args.swiglu else args.no_bias_gelu_fusion),
        bias_dropout_fusion=gpu and not args.no_bias_dropout_fusion,
        persist_layer_norm=gpu and caps.apex and not args.no_persist_layer_norm,
    )


def gradient_accumulation_fusion(args, transformer_impl: str, caps: Optional[Capabilities] = None) -> bool:
    """Megatron-LM's default (on unless --no-gradient-accumulation-fusion) where a kernel exists:
    TE's linears fuse it themselves; local linears need apex's fused_weight_gradient_mlp_cuda.
    The weight gradient is then accumulated straight into megatron DDP's `main_grad`, so it is off
    with DeepSpeed (no main_grad). WeSaR gates the linear's output, so its weight is the parameter
    itself and the fused gradient is dL/dW (tests/unit/test_wesar.py)."""
    caps = caps or current()
    if args.no_gradient_accumulation_fusion or not caps.cuda:
        return False
    if getattr(args, "deepspeed", False):
        return False
    if transformer_impl == "transformer_engine":
        return caps.transformer_engine
    return caps.fused_wgrad


def needs_single_device_connection(args, caps: Optional[Capabilities] = None) -> bool:
    """Megatron-LM requires CUDA_DEVICE_MAX_CONNECTIONS=1 with TP (or CP) > 1 before Blackwell
    (sm_100): one hardware queue keeps TP communication kernels ordered ahead of the GEMMs they
    overlap with. Blackwell and later schedule by stream priority instead."""
    caps = caps or current()
    parallel = args.tensor_model_parallel_size > 1 or getattr(args, "context_parallel_size", 1) > 1
    return caps.cuda and parallel and (caps.arch_major is None or caps.arch_major < 10)


def set_device_max_connections(args, caps: Optional[Capabilities] = None, environ=os.environ) -> Optional[str]:
    """Set CUDA_DEVICE_MAX_CONNECTIONS=1 where `needs_single_device_connection` (before the CUDA
    context exists, i.e. before any tensor is put on the GPU). Returns a notice, or None."""
    if not needs_single_device_connection(args, caps):
        return None
    value = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if value == "1":
        return None
    if value is not None:
        return (f"CUDA_DEVICE_MAX_CONNECTIONS={value} with TP > 1: Megatron-LM requires 1 before "
                "Blackwell for communication overlap; left as set")
    environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return "set CUDA_DEVICE_MAX_CONNECTIONS=1 (TP > 1 before Blackwell, as Megatron-LM requires)"
