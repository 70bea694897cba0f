"""Loss-spike stabilization for megatron-core GPT models.

Adds the fixes of "Spike No More" (Takase et al., arXiv 2312.16903) and WeSaR
(Nishida et al., EMNLP 2024) as typed config fields on top of megatron-core's GPTModel.
Every option defaults to upstream behaviour.
"""

__version__ = "0.1.0"

from .compat import cuda_build_notice as _cuda_build_notice

_cuda_build_notice.install()  # before megatron-core or DeepSpeed import torch.utils.cpp_extension
