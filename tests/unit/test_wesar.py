"""[WeSaR]: uniform std(W), std(alpha*W) = the init scheme's target, exact fold-back, no decay."""

import math

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer import _get_param_groups

from megatron_patch.config import StabilityConfig
from megatron_patch.model import build_gpt_model
from megatron_patch.optim import param_group_overrides
from megatron_patch.wesar import fold_wesar_gates, plain_state_dict, wesar_layers

LAYERS, D, VOCAB, SEQ = 4, 256, 128, 16
SHAPE = dict(num_layers=LAYERS, hidden_size=D, num_attention_heads=4, use_cpu_initialization=True,
             hidden_dropout=0.0, attention_dropout=0.0)


def build(**options):
    torch.manual_seed(0)
    return build_gpt_model(StabilityConfig(**SHAPE, **options), VOCAB, SEQ)


def logits(model):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    return model(ids, torch.arange(SEQ).expand(2, SEQ), None)


@pytest.mark.parametrize("style", ["scaled", "plain"])
def test_common_std_and_gated_target_std(mcore, style):
    common = math.sqrt(4e-5)
    model = build(wesar=True, wesar_init_std=common, init_style=style)
    layers = wesar_layers(model)
    assert len(layers) == 4 * LAYERS  # qkv, proj, fc1, fc2 in every layer
    sigma = 0.02
    sigma_out = sigma / math.sqrt(2 * LAYERS) if style == "scaled" else sigma
    for name, layer in layers:
        assert layer.weight.std().item() == pytest.approx(common, rel=0.03), name
        target = sigma_out if name.endswith(("linear_proj", "linear_fc2")) else sigma
        assert layer.wesar_gate.item() == pytest.approx(target / common, rel=1e-6), name
        effective = (layer.wesar_gate * layer.weight).std().item()
        assert effective == pytest.approx(target, rel=0.03), name
    # Embedding and output layer are not gated.
    assert not any("embedding" in n or "output_layer" in n for n, _ in layers)


def test_gate_gets_gradient_and_forward_uses_alpha_w(mcore):
    model = build(wesar=True)
    layer = model.decoder.layers[0].mlp.linear_fc1
    before = logits(model)
    with torch.no_grad():
        layer.wesar_gate.mul_(2.0)
    assert not torch.equal(before, logits(model))
    logits(model).float().pow(2).mean().backward()
    assert all(l.wesar_gate.grad is not None and l.wesar_gate.grad.abs().item() > 0
               for _, l in wesar_layers(model))


def test_fold_back_is_exact(mcore):
    model = build(wesar=True, wesar_init_std=0.01)
    with torch.no_grad():  # gates away from their init, as after training
        for i, (_, layer) in enumerate(wesar_layers(model)):
            layer.wesar_gate.mul_(1.0 + 0.1 * i)
    reference = logits(model)
    plain = build(wesar=False)
    plain.load_state_dict(plain_state_dict(model))
    assert torch.equal(logits(plain), reference)
    assert fold_wesar_gates(model) == 4 * LAYERS
    assert torch.equal(logits(model), reference)
    assert all(l.wesar_gate.item() == 1.0 for _, l in wesar_layers(model))


@pytest.mark.parametrize("no_embedding_wd", [False, True])
def test_weight_decay_groups(mcore, no_embedding_wd):
    model = build(wesar=True)
    opt_cfg = OptimizerConfig(lr=1e-3, weight_decay=0.1)
    groups = _get_param_groups([model], opt_cfg, param_group_overrides(opt_cfg, no_embedding_wd))
    wd_of = {id(p): g["wd_mult"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name, param in named.items():
        if name.endswith("wesar_gate") or name.endswith(".bias") or param.dim() == 1:
            assert wd_of[id(param)] == 0.0, name
        elif "embedding" in name:
            assert wd_of[id(param)] == (0.0 if no_embedding_wd else 1.0), name
        else:
            assert wd_of[id(param)] == 1.0, name


def test_default_common_std_is_the_papers(mcore):
    """--wesar without --wesar-init-std: the paper's sigma^2 = 4e-5 for every W."""
    model = build(wesar=True)
    assert model.config.wesar_init_std == pytest.approx(math.sqrt(4e-5))
    weight = model.decoder.layers[0].mlp.linear_fc1.weight
    assert weight.std().item() == pytest.approx(math.sqrt(4e-5), rel=0.05)
