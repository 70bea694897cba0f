"""Optimizer parameter groups for the stabilized model (weight-decay exclusions).

megatron-core's standard rule already exempts biases and 1-D parameters from weight decay; the
WeSaR gates have shape [1] and are exempt by that same rule. `--no-embedding-weight-decay` adds the
word and position embedding tables (the output layer keeps decay unless it is tied to them).
"""

from typing import Dict

from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

EMBEDDING_TABLES = ("*embedding.word_embeddings.weight", "*embedding.position_embeddings.weight")


def param_group_overrides(
    optimizer_config: OptimizerConfig, no_embedding_weight_decay: bool = False
) -> Dict[ParamKey, ParamGroupOverride]:
    """`config_overrides` for megatron.core.optimizer.get_megatron_optimizer."""
    overrides = get_standard_config_overrides(config=optimizer_config)
    if no_embedding_weight_decay:
        overrides[ParamKey(name=EMBEDDING_TABLES)] = ParamGroupOverride(wd_mult=0.0)
    return overrides
