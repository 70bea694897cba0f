"""[WeSaR]: uniform std(W), std(alpha*W) = the target scheme's, separate Q/K/V gates against an
unfused reference, the bias outside the gate, fold-back, gradient-accumulation fusion, no decay."""

import math
import types

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer import _get_param_groups
from megatron.core.tensor_parallel import layers as mcore_layers

from megatron_patch.config import StabilityConfig, StabilityConfigError
from megatron_patch.model import build_gpt_model
from megatron_patch.optim import param_group_overrides
from megatron_patch.wesar import fold_wesar_gates, plain_state_dict, target_stds, wesar_layers
from tests.tolerances import summation_atol

LAYERS, D, VOCAB, SEQ = 4, 256, 128, 16
SHAPE = dict(num_layers=LAYERS, hidden_size=D, num_attention_heads=4, use_cpu_initialization=True,
             hidden_dropout=0.0, attention_dropout=0.0)
GQA = dict(num_attention_heads=8, num_query_groups=2)


def build(tied=False, shape=SHAPE, **options):
    torch.manual_seed(0)
    return build_gpt_model(StabilityConfig(**{**shape, **options}), VOCAB, SEQ,
                           share_embeddings_and_output_weights=tied)


def logits(model):
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    return model(ids, torch.arange(SEQ).expand(2, SEQ), None)


def perturb_gates(model):
    """Gates away from their init (and Q, K, V apart), as after training."""
    with torch.no_grad():
        for i, (_, layer) in enumerate(wesar_layers(model)):
            layer.wesar_gate.mul_(1.0 + 0.1 * i + 0.05 * torch.arange(layer.wesar_gate.numel()))


@pytest.mark.parametrize("style", ["scaled", "xavier"])
@pytest.mark.parametrize("targets", ["init", "he"])
def test_common_std_and_gated_target_std(mcore, style, targets):
    common = math.sqrt(4e-5)
    model = build(wesar=True, wesar_init_std=common, init_style=style, wesar_targets=targets)
    layers = dict(wesar_layers(model))
    assert len(layers) == 4 * LAYERS + 1  # qkv, proj, fc1, fc2 in every layer, and the untied head
    depth = 1.0 if style == "xavier" else 1.0 / math.sqrt(2 * LAYERS)
    if targets == "init":
        sigma = 0.02
        want = dict(qkv=sigma, fc1=sigma, head=sigma, proj=sigma * depth, fc2=sigma * depth)
    else:  # He: sqrt(2/fan_in), W_O and W_2 with residual scaling
        want = dict(qkv=math.sqrt(2 / D), fc1=math.sqrt(2 / D), head=math.sqrt(2 / D),
                    proj=math.sqrt(2 / D) * depth, fc2=math.sqrt(2 / (4 * D)) * depth)
    assert target_stds(model.config) == pytest.approx(want)
    for name, layer in layers.items():
        key = "head" if name == "output_layer" else name.rsplit("linear_", 1)[1]
        assert layer.weight.std().item() == pytest.approx(common, rel=0.03), name
        assert layer.wesar_gate.numel() == (3 if key == "qkv" else 1), name
        assert torch.allclose(layer.wesar_gate, torch.tensor(want[key] / common)), name
        effective = layer.folded_weight().std().item()
        assert effective == pytest.approx(want[key], rel=0.03), name
    assert not any("embedding" in n for n in layers)


def test_tied_head_and_switches(mcore):
    assert "output_layer" not in dict(wesar_layers(build(tied=True, wesar=True)))
    assert "output_layer" not in dict(wesar_layers(build(wesar=True, wesar_gate_output_layer=False)))
    fused = build(wesar=True, wesar_fused_qkv_gate=True)
    assert fused.decoder.layers[0].self_attention.linear_qkv.wesar_gate.numel() == 1
    emb = build(wesar=True, wesar_embedding_common_std=True).embedding.word_embeddings.weight
    assert emb.std().item() == pytest.approx(math.sqrt(4e-5), rel=0.03)
    with pytest.raises(StabilityConfigError, match="only apply with wesar"):
        StabilityConfig(**SHAPE, wesar_fused_qkv_gate=True)
    with pytest.raises(ValueError, match="gradient-accumulation fusion"):
        build(wesar=True, wesar_gate_side="weight", gradient_accumulation_fusion=True)


SIDES = ["weight", "activation"]  # alpha * W into the matmul / on the output or input (TE's path)


@pytest.mark.parametrize("side", SIDES)
def test_separate_qkv_gates_equal_unfused_reference(mcore, side):
    """GQA layout: q, k, v of the gated fused layer = alpha_q * (W_q x), alpha_k * (W_k x),
    alpha_v * (W_v x) computed by the plain layer, as are the gradients of W and alpha."""
    shape = {**SHAPE, **GQA, "add_bias_linear": False}
    gated = build(shape=shape, wesar=True, wesar_init_std=0.01, wesar_gate_side=side)
    perturb_gates(gated)
    plain = build(shape=shape)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "wesar_gate" not in k})
    attn, ref_attn = gated.decoder.layers[0].self_attention, plain.decoder.layers[0].self_attention
    alpha = attn.linear_qkv.wesar_gate
    ref_alpha = alpha.detach().clone().requires_grad_(True)
    x = torch.randn(SEQ, 2, D, generator=torch.Generator().manual_seed(5))
    q, k, v = attn.get_query_key_value_tensors(x)[:3]
    rq, rk, rv = ref_attn.get_query_key_value_tensors(x)[:3]
    rq, rk, rv = ref_alpha[0] * rq, ref_alpha[1] * rk, ref_alpha[2] * rv
    cot = [torch.randn_like(t, generator=torch.Generator().manual_seed(i)) for i, t in enumerate((q, k, v))]
    sum((a * c).sum() for a, c in zip((q, k, v), cot)).backward()
    sum((a * c).sum() for a, c in zip((rq, rk, rv), cot)).backward()
    for out, ref in ((q, rq), (k, rk), (v, rv)):
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)  # (alpha W) x vs alpha (W x): rounding
    assert torch.allclose(alpha.grad, ref_alpha.grad, rtol=1e-5)
    # The reference's W gradient passes through alpha_q/k/v too: the same dL/dW, block by block.
    assert torch.allclose(attn.linear_qkv.weight.grad, ref_attn.linear_qkv.weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", SIDES)
def test_bias_stays_outside_the_gate(mcore, side):
    model = build(wesar=True, wesar_gate_side=side)
    fc1 = model.decoder.layers[0].mlp.linear_fc1
    with torch.no_grad():
        fc1.bias.uniform_(-1, 1)
        fc1.wesar_gate.fill_(2.0)
    x = torch.randn(SEQ, 2, D)
    out, bias = fc1(x)
    assert bias is not None  # fc1 leaves the bias to megatron's bias-activation fusion, as upstream
    assert torch.allclose(out, 2.0 * (x @ fc1.weight.t()), rtol=1e-6, atol=1e-6)
    qkv = model.decoder.layers[0].self_attention.linear_qkv  # adds its bias itself
    with torch.no_grad():
        qkv.bias.uniform_(-1, 1)
    out, bias = qkv(x)
    assert bias is None
    scale = qkv.wesar_channel_scale().detach()
    want = (x @ qkv.weight.t()).view(SEQ, 2, -1, 3, D // 4) * scale + qkv.bias.view(-1, 3, D // 4)
    assert torch.allclose(out, want.view_as(out), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("shape", [SHAPE, {**SHAPE, **GQA}], ids=["mha", "gqa"])
def test_fold_back_gives_the_same_function(mcore, shape, side):
    """alpha * (W x) and (alpha * W) x differ only by float rounding."""
    model = build(shape=shape, wesar=True, wesar_init_std=0.01, wesar_gate_side=side)
    perturb_gates(model)
    reference = logits(model)
    plain = build(shape=shape)
    plain.load_state_dict(plain_state_dict(model))
    assert torch.allclose(logits(plain), reference, rtol=1e-5, atol=1e-5)
    assert fold_wesar_gates(model) == 4 * LAYERS + 1
    assert torch.allclose(logits(model), reference, rtol=1e-5, atol=1e-5)
    assert all(bool((layer.wesar_gate == 1.0).all()) for _, layer in wesar_layers(model))


def test_gradient_accumulation_fusion_writes_the_gated_gradient(mcore, monkeypatch):
    """The fused weight-gradient path (apex's kernel replaced by its definition, main_grad +=
    dy^T x) accumulates the same dL/dW into main_grad as autograd does without the fusion."""
    def accum(total_input, grad_output, main_grad):
        main_grad.add_(grad_output.t().matmul(total_input).to(main_grad.dtype))

    monkeypatch.setattr(mcore_layers, "_grad_accum_fusion_available", True)
    monkeypatch.setattr(mcore_layers, "fused_weight_gradient_mlp_cuda",
                        types.SimpleNamespace(wgrad_gemm_accum_fp32=accum), raising=False)
    grads = []
    assert all(layer.wesar_side != "weight"
               for _, layer in wesar_layers(build(wesar=True, gradient_accumulation_fusion=True)))
    for fusion in (False, True):  # both gated on the activations, as the fused run must be
        model = build(wesar=True, gradient_accumulation_fusion=fusion, wesar_gate_side="activation")
        perturb_gates(model)
        for _, layer in wesar_layers(model):
            layer.weight.main_grad = torch.zeros_like(layer.weight)
        logits(model).pow(2).mean().backward()
        grads.append({n: (layer.weight.main_grad.clone() if fusion else layer.weight.grad, layer.wesar_gate.grad)
                      for n, layer in wesar_layers(model)})
    for name, (w, a) in grads[0].items():
        assert grads[1][name][0].abs().sum() > 0, name
        assert torch.allclose(grads[1][name][0], w, rtol=1e-5, atol=summation_atol(w)), name
        assert torch.allclose(grads[1][name][1], a, rtol=1e-5), name


@pytest.mark.parametrize("no_embedding_wd", [False, True])
def test_weight_decay_groups(mcore, no_embedding_wd):
    model = build(wesar=True)
    opt_cfg = OptimizerConfig(lr=1e-3, weight_decay=0.1)
    groups = _get_param_groups([model], opt_cfg, param_group_overrides(opt_cfg, no_embedding_wd))
    wd_of = {id(p): g["wd_mult"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
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


def _saved_bytes(model):
    """Bytes of the distinct storages autograd keeps for backward in one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits(model).sum()
    return sum(storages.values())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gates_keep_no_extra_activations(mcore, tied, bias):
    """Gated on the activations (as on TE's linears), each gate saves a tensor that backward keeps
    anyway (plus the few gate scalars); autograd's own alpha * y would keep every pre-gate output
    alive too. (With biases, fc1's bias goes to megatron's fused bias-GELU, as on a GPU; unfused,
    torch's bias add would save its own copy.)"""
    shape = {**SHAPE, "add_bias_linear": bias, "bias_activation_fusion": bias}
    plain = _saved_bytes(build(tied=tied, shape=shape))
    gated = _saved_bytes(build(tied=tied, shape=shape, wesar=True, wesar_gate_side="activation"))
    assert gated <= plain * 1.001, (plain, gated)


def test_resume_of_a_checkpoint_with_the_earlier_gate_layout_names_the_flags():
    """Checkpoints saved before separate Q/K/V gates and the head gate hold one QKV gate and no
    head gate: the resume check names the two flags that rebuild that layout."""
    import argparse

    from megatron_patch.training.model_builder import model_flag_differences

    old = dict(wesar=True, untie_embeddings_and_output_weights=True, hidden_size=64,
               num_attention_heads=4)  # and no wesar_* layout keys
    run = dict(old, wesar_fused_qkv_gate=False, wesar_no_output_gate=False)
    found = [d for d in model_flag_differences(old, argparse.Namespace(**run)) if "gate" in d]
    assert found == ["--wesar-fused-qkv-gate: checkpoint given, this run not given",
                     "--wesar-no-output-gate: checkpoint given, this run not given"]
    matching = dict(old, wesar_fused_qkv_gate=True, wesar_no_output_gate=True)
    assert not [d for d in model_flag_differences(old, argparse.Namespace(**matching)) if "gate" in d]
    assert not [d for d in model_flag_differences(run, argparse.Namespace(**run)) if "gate" in d]
