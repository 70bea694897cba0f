"""Spike detector rules and per-layer gradient norms (single process)."""

import math

import pytest
import torch

from megatron_patch.config import StabilityConfig
from megatron_patch.model import build_gpt_model
from megatron_patch.monitor.grad_stats import group_keys, squared_norms
from megatron_patch.monitor.spike_detector import SpikeDetector


def noisy_losses(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [3.0 - 0.001 * i + 0.02 * torch.randn(1, generator=g).item() for i in range(n)]


@pytest.mark.parametrize("rule", [dict(z_threshold=6.0), dict(z_threshold=None, ratio_threshold=1.3)])
def test_detector_flags_exactly_the_injected_steps(rule):
    det = SpikeDetector(window=32, min_history=8, **rule)
    spikes_at = {40, 41, 77}
    flagged = []
    for i, loss in enumerate(noisy_losses(120), start=1):
        value = loss * 2.0 if i in spikes_at else loss
        flagged += [e.iteration for e in det.observe(i, loss=value, grad_norm=1.0)]
    assert set(flagged) == spikes_at


def test_non_finite_is_always_a_spike_and_history_is_respected():
    det = SpikeDetector(window=16, min_history=8)
    assert det.observe(1, loss=float("nan"))[0].reason == "non-finite"
    assert det.observe(2, loss=1.0, grad_norm=float("inf"))[0].metric == "grad_norm"
    assert det.observe(3, loss=100.0) == []  # too little history to judge a finite value
    state = det.state_dict()
    other = SpikeDetector(window=16, min_history=8)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_spikes_do_not_enter_the_window():
    det = SpikeDetector(window=16, min_history=4, z_threshold=None, ratio_threshold=1.5)
    for i in range(1, 9):
        det.observe(i, loss=1.0)
    for i in range(9, 20):  # a long plateau of spikes keeps being flagged
        assert det.observe(i, loss=3.0), i


def test_per_layer_grad_norms_equal_direct_computation(mcore):
    torch.manual_seed(0)
    cfg = StabilityConfig(num_layers=3, hidden_size=32, num_attention_heads=4,
                          use_cpu_initialization=True, wesar=True, embed_layernorm=True)
    model = build_gpt_model(cfg, 64, 16)
    ids = torch.randint(0, 64, (2, 16))
    model(ids, torch.arange(16).expand(2, 16), None, labels=ids).mean().backward()
    norms = squared_norms([model], cfg.num_layers)
    assert set(norms) == set(group_keys(3))
    params = dict(model.named_parameters())

    def direct(pred):
        return sum(p.grad.double().pow(2).sum().item() for n, p in params.items() if pred(n))

    layer = model.decoder.layers[1]  # layer_number 2
    assert norms[(2, "ffn")] == pytest.approx(direct(lambda n: "layers.1.mlp." in n and "gate" not in n))
    assert norms[(2, "gate")] == pytest.approx(direct(lambda n: "layers.1." in n and n.endswith("gate")))
    assert norms[(2, "ln")] == pytest.approx(direct(lambda n: "layers.1." in n and "layernorm" in n))
    assert norms[(None, "embedding")] == pytest.approx(direct(lambda n: n.startswith("embedding.")))
    assert layer.layer_number == 2
    total = math.sqrt(sum(norms.values()))
    assert total == pytest.approx(math.sqrt(direct(lambda n: True)), rel=1e-9)


def test_activation_stats_match_the_ln_inputs(mcore):
    from megatron_patch.monitor.activation_stats import ActivationStats
    from megatron_patch.monitor.layer_stats import LayerNormProbes

    torch.manual_seed(0)
    cfg = StabilityConfig(num_layers=3, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    model = build_gpt_model(cfg, 64, 16)
    ids = torch.randint(0, 64, (2, 16))
    with ActivationStats([model], 3) as stats, LayerNormProbes(model) as probes:
        model(ids, torch.arange(16).expand(2, 16), None, labels=ids)
    result = stats.result()
    assert result[(1, "attn_ln_in")] == pytest.approx(
        probes.probes["decoder.layers.0.input_layernorm"].input_std(), rel=0.05)
    # Vanilla recipe: the stream grows with depth ([SNM] §3).
    assert result[(1, "attn_ln_in")] < result[(3, "attn_ln_in")] < result[(None, "final_ln_in")]


def test_transformer_engine_parameter_names_are_classified_by_role():
    """megatron-core's TE spec fuses each pre-LN into the next linear (TELayerNormColumnParallelLinear
    for linear_qkv and linear_fc1, whose norm parameters are layer_norm_weight / layer_norm_bias)."""
    from megatron_patch.monitor.grad_stats import classify

    expected = {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": "ln",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": "ln",
        "decoder.layers.0.self_attention.linear_qkv.weight": "attention",
        "decoder.layers.0.self_attention.linear_qkv.bias": "attention",
        "decoder.layers.0.self_attention.linear_proj.weight": "attention",
        "decoder.layers.0.self_attention.q_layernorm.weight": "ln",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": "ln",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_bias": "ln",
        "decoder.layers.0.mlp.linear_fc1.weight": "ffn",
        "decoder.layers.0.mlp.linear_fc2.bias": "ffn",
        "decoder.layers.0.input_layernorm.weight": "ln",  # local layers
        "decoder.layers.0.pre_mlp_layernorm.bias": "ln",
    }
    assert {name: classify(name, 1) for name in expected} == {n: (1, g) for n, g in expected.items()}
    assert classify("decoder.final_layernorm.weight", None) == (None, "final_ln")
    assert classify("embedding.stabilizer.norm.weight", None) == (None, "embedding")
