"""Norm layer choice for the model builder, including sequence parallelism without apex/TE.

Upstream's fallback norm (`WrappedTorchNorm`, used when neither apex nor Transformer Engine is
installed) refuses `sequence_parallel`. Under sequence parallelism each TP rank normalises its own
slice of the sequence, so the norm parameters only need their gradients summed over the TP group;
megatron-core's `finalize_model_grads` does exactly that for parameters marked
`sequence_parallel = True`. `SequenceParallelTorchNorm` builds the same torch norm as upstream and
adds that mark.
"""

import torch

from megatron.core.transformer.transformer_config import TransformerConfig

# Upstream's own detection: LNImpl is apex's FusedLayerNorm (which supports sequence
# parallelism, but only LayerNorm) when apex is importable, else WrappedTorchNorm.
from megatron.core.models.gpt.gpt_layer_specs import LNImpl
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class SequenceParallelTorchNorm:
    """torch LayerNorm/RMSNorm, built as upstream's WrappedTorchNorm, usable with sequence_parallel."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("zero-centered gamma / memory-efficient LN need apex or Transformer Engine")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported by torch norms")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def upstream_local_norm_class(config: TransformerConfig):
    """The norm class megatron-core's local spec puts in the layers for `config.normalization`
    (models/backends.py, LocalSpecProvider.layer_norm): apex's FusedLayerNorm for LayerNorm where
    apex is installed, torch's norm otherwise and always for RMSNorm (FusedLayerNorm asserts
    LayerNorm). Decided here without calling LocalSpecProvider.layer_norm, which for RMSNorm
    also rebinds its module's LNImpl to WrappedTorchNorm for the rest of the process."""
    return WrappedTorchNorm if config.normalization == "RMSNorm" else LNImpl


def local_norm_class(config: TransformerConfig):
    """The norm class for the local (non-TE) spec: upstream's own unless it cannot do the job
    (torch's norm refuses sequence_parallel)."""
    norm = upstream_local_norm_class(config)
    if config.sequence_parallel and norm is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    return norm
