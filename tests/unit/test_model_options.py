"""Each stabilization option: off = stock megatron-core, on = its documented property."""

import math

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.config import StabilityConfig
from megatron_patch.model import build_gpt_model
from tests.tolerances import assert_close_up_to_summation_order

VOCAB, SEQ, BATCH = 256, 32, 4
SHAPE = dict(num_layers=3, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
             hidden_dropout=0.0, attention_dropout=0.0)


def build(seed=0, stock=False, pos="learned_absolute", tied=True, **options):
    torch.manual_seed(seed)
    if stock:
        cfg = TransformerConfig(**SHAPE)
        return GPTModel(cfg, get_gpt_layer_local_spec(), VOCAB, SEQ, position_embedding_type=pos,
                        share_embeddings_and_output_weights=tied)
    cfg = StabilityConfig(**SHAPE, **options)
    return build_gpt_model(cfg, VOCAB, SEQ, position_embedding_type=pos,
                           share_embeddings_and_output_weights=tied)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.arange(SEQ).expand(BATCH, SEQ)


def logits(model):
    ids, pos = batch()
    return model(ids, pos, None)


def embedding_output(model):
    """The tensor entering the first layer (output of the embedding, dropout is 0)."""
    ids, pos = batch()
    return model.embedding(input_ids=ids, position_ids=pos)


@pytest.mark.parametrize("tied", [True, False])
def test_all_options_off_is_bit_identical_to_stock(mcore, tied):
    ours, stock = build(tied=tied), build(stock=True, tied=tied)
    assert type(ours) is GPTModel
    ours_sd, stock_sd = ours.state_dict(), stock.state_dict()
    assert ours_sd.keys() == stock_sd.keys()
    for name in stock_sd:
        if isinstance(stock_sd[name], torch.Tensor):
            assert torch.equal(ours_sd[name], stock_sd[name]), name
    assert torch.equal(logits(ours), logits(stock))


@pytest.mark.parametrize("options", [dict(scaled_embed=True), dict(embed_layernorm=True),
                                     dict(embed_detach_alpha=0.1)])
def test_embedding_options_leave_upstream_weights_untouched(mcore, options):
    ours, stock = build(**options).state_dict(), build(stock=True).state_dict()
    for name, value in stock.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[name], value), name


def test_scaled_embed_multiplies_embedding_output_by_sqrt_d(mcore):
    d = SHAPE["hidden_size"]
    stock, scaled = build(stock=True, pos="rope"), build(scaled_embed=True, pos="rope")
    plain_out, scaled_out = embedding_output(stock), embedding_output(scaled)
    assert torch.allclose(scaled_out, plain_out * math.sqrt(d), rtol=1e-6, atol=0)
    sigma = scaled.config.embedding_init_method_std
    assert scaled_out.std().item() == pytest.approx(math.sqrt(d) * sigma, rel=0.05)


def test_embed_layernorm_makes_embedding_output_std_one(mcore):
    model = build(embed_layernorm=True)
    out, raw = embedding_output(model), embedding_output(build(stock=True))
    assert raw.std().item() < 0.05  # tiny without the fix
    # Per token std 1, up to LayerNorm's eps (1e-5 against a variance of ~8e-4 here).
    assert out.std(dim=-1, unbiased=False).mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.allclose(out, torch.nn.functional.layer_norm(raw, (raw.shape[-1],), eps=1e-5), atol=1e-5)
    norm = model.embedding.stabilizer.norm
    assert norm.weight.dtype == torch.float32
    assert {"embedding.stabilizer.norm.weight", "embedding.stabilizer.norm.bias"} <= set(model.state_dict())


def test_embed_detach_keeps_forward_and_scales_embedding_gradient(mcore):
    gamma = 0.1
    stock, detach = build(stock=True, tied=False), build(embed_detach_alpha=gamma, tied=False)
    ids, pos = batch()
    out_stock, out_detach = stock(ids, pos, None, labels=ids), detach(ids, pos, None, labels=ids)
    assert torch.equal(out_stock, out_detach)
    out_stock.mean().backward()
    out_detach.mean().backward()
    for table in ("word_embeddings", "position_embeddings"):
        g_stock = getattr(stock.embedding, table).weight.grad
        g_detach = getattr(detach.embedding, table).weight.grad
        assert_close_up_to_summation_order(g_detach, gamma * g_stock, msg=table)
    # Everything after the embedding sees the unchanged gradient.
    w = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(dict(stock.named_parameters())[w].grad, dict(detach.named_parameters())[w].grad)


def _matrix_stds(model):
    return {n.split("decoder.")[-1]: p.std().item() for n, p in model.named_parameters()
            if p.dim() == 2 and "decoder.layers" in n}


@pytest.mark.parametrize("style", ["scaled", "plain", "xavier"])
@pytest.mark.parametrize("small", [False, True])
def test_init_style_and_small_init_stds(mcore, style, small):
    cfg_kw = dict(init_style=style, small_init=small)
    # Bigger matrices so the empirical std is tight.
    torch.manual_seed(0)
    cfg = StabilityConfig(**{**SHAPE, "hidden_size": 256, "num_layers": 4}, **cfg_kw)
    model = build_gpt_model(cfg, VOCAB, SEQ)
    sigma = math.sqrt(2 / (5 * 256)) if small else 0.02
    assert cfg.init_method_std == pytest.approx(sigma)
    sigma_out = sigma if style in ("plain", "xavier") else sigma / math.sqrt(2 * 4)
    for name, std in _matrix_stds(model).items():
        expected = sigma_out if ("linear_proj" in name or "linear_fc2" in name) else sigma
        assert std == pytest.approx(expected, rel=0.03), name
    assert model.embedding.word_embeddings.weight.std().item() == pytest.approx(sigma, rel=0.03)


def test_embedding_init_std_one(mcore):
    torch.manual_seed(0)
    cfg = StabilityConfig(**SHAPE, embedding_init_method_std=1.0)
    model = build_gpt_model(cfg, VOCAB, SEQ)
    assert model.embedding.word_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.03)
    assert model.decoder.layers[0].mlp.linear_fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
