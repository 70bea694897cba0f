"""[SNM] §4 embedding treatments: Scaled Embed, Embed LN, and the Embed Detach baseline.

Where it sits: on the output of megatron-core's `LanguageModelEmbedding` (word + position
[+ token-type] embeddings, after the [b s h] -> [s b h] transpose and the sequence-parallel
scatter) immediately before the embedding dropout, i.e. exactly the tensor that enters the first
layer's LayerNorm, whose input std the paper's analysis is about ([SNM v2] Eq. 9-10; v4 Eq. 12-14
[unverified]). It is applied by
a forward pre-hook on `embedding.embedding_dropout`, so upstream's forward runs unmodified; the
module itself is registered as `embedding.stabilizer` (checkpoint names
`embedding.stabilizer.norm.weight/bias` for Embed LN).
"""

import math

import torch

from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

from .config import StabilityConfig


class EmbeddingStabilizer(torch.nn.Module):
    """Maps the embedding output e to sqrt(d)*e, LN(e), or the Embed Detach mix."""

    def __init__(self, config: StabilityConfig, norm_class):
        super().__init__()
        self.mode = config.embedding_fix
        if self.mode is None:
            raise ValueError("EmbeddingStabilizer needs one of scaled_embed/embed_layernorm/embed_detach_alpha")
        self.scale = math.sqrt(config.hidden_size)
        self.detach_alpha = config.embed_detach_alpha
        # Built like every other norm of the model (same class, fp32 params, SP-marked).
        self.norm = (
            norm_class(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
            if self.mode == "layernorm"
            else None
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.mode == "scale":
            return embeddings * self.scale
        if self.mode == "layernorm":
            return self.norm(embeddings)
        # Embed Detach: gamma*e + (1-gamma)*e.detach(), written so that the forward value is
        # bit-identical to e (e - e.detach() is exactly 0) while d/de = gamma.
        detached = embeddings.detach()
        return detached + self.detach_alpha * (embeddings - detached)

    def extra_repr(self) -> str:
        return f"mode={self.mode}" + (f", alpha={self.detach_alpha}" if self.mode == "detach" else "")


def _apply_before_dropout(dropout: torch.nn.Module, args):
    (embeddings,) = args
    return (dropout._stabilizer(embeddings),)


def attach_embedding_stabilizer(
    embedding: LanguageModelEmbedding, config: StabilityConfig, norm_class
) -> EmbeddingStabilizer:
    """Register `embedding.stabilizer` and run it on the dropout's input. Call once, after build."""
    if hasattr(embedding, "stabilizer"):
        raise RuntimeError("embedding stabilizer is already attached")
    embedding.stabilizer = EmbeddingStabilizer(config, norm_class)
    # Plain attribute (not a submodule) so the parameters are registered once, under `stabilizer`.
    object.__setattr__(embedding.embedding_dropout, "_stabilizer", embedding.stabilizer)
    embedding.embedding_dropout.register_forward_pre_hook(_apply_before_dropout)
    return embedding.stabilizer
