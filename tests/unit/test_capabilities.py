"""The GPU decisions of megatron_patch.capabilities, tested on CPU with fake capability sets:
Transformer Engine detection, the default layer implementation, gradient-accumulation fusion,
CUDA_DEVICE_MAX_CONNECTIONS, and the Embed LN norm class where apex is installed."""

import dataclasses
import importlib

import pytest

from megatron_patch import capabilities
from megatron_patch.capabilities import Capabilities
from megatron_patch.training.arguments import parse_and_validate
from tests.train_helpers import tiny_args

CPU = Capabilities(cuda=False, transformer_engine=False, apex=False, fused_wgrad=False, masked_softmax=False)
GPU_NO_TE = dataclasses.replace(CPU, cuda=True, arch_major=9)
NGC = dataclasses.replace(GPU_NO_TE, transformer_engine=True, apex=True, fused_wgrad=True, masked_softmax=True)


def validate(*extra, caps):
    with capabilities.use(caps):
        return parse_and_validate([str(a) for a in tiny_args("--train-iters", 4, *extra, mock=True)])


def test_transformer_engine_is_not_detected_by_importing_megatron_cores_extension():
    # Upstream replaces the missing package with a MagicMock, so this import succeeds without TE.
    importlib.import_module("megatron.core.extensions.transformer_engine")
    has_te = importlib.util.find_spec("transformer_engine") is not None
    assert capabilities.detect().transformer_engine == has_te


def test_default_layers_are_local_on_a_gpu_machine_without_transformer_engine():
    assert validate(caps=GPU_NO_TE).transformer_impl == "local"
    assert validate(caps=NGC).transformer_impl == "transformer_engine"
    assert validate(caps=CPU).transformer_impl == "local"
    assert validate("--transformer-impl", "local", caps=NGC).transformer_impl == "local"


def test_transformer_engine_layers_refused_in_one_line_without_the_package():
    from megatron_patch.config import StabilityConfig, StabilityConfigError
    from megatron_patch.model import build_layer_spec

    with capabilities.use(GPU_NO_TE), pytest.raises(StabilityConfigError, match="needs Transformer Engine"):
        build_layer_spec(StabilityConfig(num_layers=2, hidden_size=64, num_attention_heads=4),
                         "transformer_engine")


@pytest.mark.parametrize("caps, extra, expected", [
    (NGC, [], True),  # TE's linears fuse it
    (NGC, ["--transformer-impl", "local"], True),  # apex's fused_weight_gradient_mlp_cuda
    (dataclasses.replace(NGC, fused_wgrad=False), ["--transformer-impl", "local"], False),
    (NGC, ["--no-gradient-accumulation-fusion"], False),
    (NGC, ["--wesar", "--transformer-impl", "local"], True),  # the gate is on the output: dL/dW unchanged
    (NGC, ["--wesar"], True),
    (GPU_NO_TE, [], False),
    (CPU, [], False),
])
def test_gradient_accumulation_fusion_where_a_kernel_exists(caps, extra, expected):
    assert validate(*extra, caps=caps).transformer_config.gradient_accumulation_fusion is expected


def test_kernel_fusions_follow_the_kernels_present():
    gpu = validate(caps=NGC).transformer_config
    assert gpu.masked_softmax_fusion and gpu.bias_activation_fusion and gpu.bias_dropout_fusion
    cpu = validate(caps=CPU).transformer_config
    assert not (cpu.masked_softmax_fusion or cpu.bias_activation_fusion or cpu.bias_dropout_fusion)


@pytest.mark.parametrize("tp, arch, before, after, noticed", [
    (2, 9, None, "1", True),  # Hopper with TP: set
    (2, 10, None, None, False),  # Blackwell: not required
    (1, 9, None, None, False),  # no TP communication to order
    (2, 8, "1", "1", False),  # already right
    (2, 9, "8", "8", True),  # a user's choice is kept, with a warning
])
def test_cuda_device_max_connections(tp, arch, before, after, noticed):
    args = parse_and_validate([str(a) for a in tiny_args("--train-iters", 4, "--tensor-model-parallel-size", tp,
                                                         mock=True)], world_size=tp)
    env = {} if before is None else {"CUDA_DEVICE_MAX_CONNECTIONS": before}
    notice = capabilities.set_device_max_connections(args, dataclasses.replace(NGC, arch_major=arch), env)
    assert env.get("CUDA_DEVICE_MAX_CONNECTIONS") == after
    assert (notice is not None) == noticed


def test_embed_layernorm_with_rmsnorm_uses_the_layer_specs_norm_where_apex_is(monkeypatch, mcore):
    """Apex's FusedLayerNorm (the local spec's LayerNorm where apex is) asserts LayerNorm; the local
    spec itself uses torch's norm for RMSNorm, and so must Embed LN."""
    import torch
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

    from megatron_patch import norm
    from megatron_patch.config import StabilityConfig
    from megatron_patch.model import build_gpt_model

    monkeypatch.setattr(norm, "LNImpl", FusedLayerNorm)  # as on a machine with apex
    cfg = StabilityConfig(num_layers=2, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
                          embed_layernorm=True, use_cpu_initialization=True)
    model = build_gpt_model(cfg, 128, 32, transformer_impl="local")
    assert isinstance(model.embedding.stabilizer.norm, torch.nn.RMSNorm)
    assert type(model.decoder.layers[0].input_layernorm) is type(model.embedding.stabilizer.norm)
    layer_norm_cfg = dataclasses.replace(cfg, normalization="LayerNorm")
    assert norm.local_norm_class(layer_norm_cfg) is FusedLayerNorm  # LayerNorm keeps apex's
