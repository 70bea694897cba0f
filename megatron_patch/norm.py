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
# parallelism) when apex is importable, else WrappedTorchNorm.
from megatron.core.models.gpt.gpt_layer_specs import HAVE_APEX, LNImpl


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


def local_norm_class(config: TransformerConfig):
    """The norm class for the local (non-TE) spec: upstream's own unless it cannot do the job."""
    if config.sequence_parallel and not HAVE_APEX:
        return SequenceParallelTorchNorm
    return LNImpl
