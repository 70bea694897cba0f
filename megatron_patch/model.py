"""One builder for the stabilized GPT model, used by the trainer, the tools and the tests.

build_gpt_model = megatron-core's GPTModel, built from upstream's layer spec with three possible
substitutions, each only when its option asks for it:
  - WeSaR-gated subclasses of the spec's QKV / proj / fc1 / fc2 linears, local or Transformer
    Engine (config.wesar), and the gate of an untied prediction head, attached after build;
  - a sequence-parallel-capable torch norm where upstream's torch norm would refuse
    sequence_parallel (no apex, or RMSNorm);
  - the [SNM] embedding stabilizer, attached to the embedding after build;
  - the z-loss, attached to the LM loss after build (z_loss.py).
With no option on, the spec and the model are exactly upstream's.
"""

import copy
from typing import Optional

from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import LayerNormImpl as BlockNormImpl
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from . import capabilities, upstream
from .config import StabilityConfig, StabilityConfigError
from .embedding import attach_embedding_stabilizer
from .norm import local_norm_class, upstream_local_norm_class
from .wesar import gate_output_layer, gated_class, target_stds
from .z_loss import attach_z_loss


def _gate_linears(layer, config: StabilityConfig) -> None:
    """Replace the four linears of a layer spec with their WeSaR-gated subclasses (in place)."""
    stds = target_stds(config)
    attention, mlp = layer.self_attention.submodules, upstream.mlp_submodules(layer.mlp)
    for owner, slot, key, mode in ((attention, "linear_qkv", "qkv", "column"),
                                   (attention, "linear_proj", "proj", "row"),
                                   (mlp, "linear_fc1", "fc1", "column"),
                                   (mlp, "linear_fc2", "fc2", "row")):
        base = getattr(owner, slot)
        setattr(owner, slot, ModuleSpec(module=gated_class(base), params=dict(
            wesar_target_std=stds[key], wesar_parallel_mode=mode, wesar_qkv=key == "qkv")))


def build_layer_spec(config: StabilityConfig, transformer_impl: str = "local", vp_stage=None):
    """Layer (or block) spec for GPTModel honouring the stabilization options."""
    if transformer_impl == "transformer_engine":
        problem = capabilities.check_transformer_impl(transformer_impl)
        if problem:
            raise StabilityConfigError(problem)
        spec = get_gpt_layer_with_transformer_engine_spec(
            normalization=config.normalization, qk_layernorm=config.qk_layernorm
        )
        if config.wesar:
            spec = copy.deepcopy(spec)
            _gate_linears(spec.submodules, config)
        return spec
    if transformer_impl != "local":
        raise StabilityConfigError(f"unknown transformer_impl {transformer_impl!r}; "
                                   "use 'local' or 'transformer_engine'")

    spec = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm)
    norm, upstream_norm = local_norm_class(config), upstream_local_norm_class(config)
    # The block builds its final norm from its own module-level choice (TENorm where TE imports,
    # else apex's FusedLayerNorm, else torch's), not from the layer spec; FusedLayerNorm cannot
    # do RMSNorm, so there the block is given the layers' norm class.
    final_norm_breaks = config.normalization == "RMSNorm" and BlockNormImpl is FusedLayerNorm
    if not config.wesar and norm is upstream_norm and not final_norm_breaks:
        return spec  # exactly upstream

    spec = copy.deepcopy(spec)
    layer = spec.submodules
    if norm is not upstream_norm:
        layer.input_layernorm = norm
        layer.pre_mlp_layernorm = norm
    if config.wesar:
        _gate_linears(layer, config)
    if norm is upstream_norm and not final_norm_breaks:
        return spec
    # The block's final norm is chosen by the block, not the layer spec: name it explicitly.
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=norm)


def embedding_norm_class(config: StabilityConfig, transformer_impl: str):
    """Embed LN's norm: the class the layer spec uses for config.normalization (TENorm under TE,
    which does LayerNorm and RMSNorm; the local spec's own choice otherwise)."""
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return local_norm_class(config)


def build_gpt_model(
    config: StabilityConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    share_embeddings_and_output_weights: bool = False,
    position_embedding_type: str = "learned_absolute",
    parallel_output: bool = True,
    transformer_impl: Optional[str] = None,
    **gpt_kwargs,
) -> GPTModel:
    """megatron-core GPTModel with the options of `config` applied. Extra kwargs go to GPTModel."""
    transformer_impl = transformer_impl or capabilities.default_transformer_impl()
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(config, transformer_impl, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        parallel_output=parallel_output,
        vp_stage=vp_stage,
        **gpt_kwargs,
    )
    if pre_process and getattr(config, "embedding_fix", None):
        attach_embedding_stabilizer(model.embedding, config, embedding_norm_class(config, transformer_impl))
    if post_process and getattr(config, "wesar", False) and config.wesar_gate_output_layer \
            and not share_embeddings_and_output_weights:
        gate_output_layer(model, config, target_stds(config)["head"])
    if post_process and getattr(config, "z_loss_coeff", 0.0):
        attach_z_loss(model, config.z_loss_coeff)
    return model
