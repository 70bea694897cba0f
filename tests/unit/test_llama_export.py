"""Llama export layouts that near-init weights would hide: RoPE base, GQA grouping, interleaved
rotary; and checkpoints carrying Transformer Engine-style `_extra_state`.

A model trained for 3 steps has attention close to uniform, where a wrong rotary base or a swapped
key/value head barely moves the logits. Here the QKV weights are scaled up (attention scores of
order several units) before export, and each layout check comes with its negative control: the
wrong layout must miss by far more than the 1e-5 tolerance the right one meets.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from megatron_patch.export import llama, megatron_io  # noqa: E402
from megatron_patch.export.convert import export_to_hf  # noqa: E402
from tests.unit.test_convert_checkpoint import GQA, LLAMA, hf_logits, hf_model, tokens, train_checkpoint  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A Llama-shaped checkpoint (GQA 4 heads / 2 groups, rotary base 5000) with QKV x 10."""
    tmp = tmp_path_factory.mktemp("llama_sharp")
    ckpt = train_checkpoint(tmp / "ckpt", *LLAMA, *GQA, "--disable-bias-linear", "--rotary-base", "5000")
    with megatron_io.loaded_checkpoint(str(ckpt)) as (model, args, common):
        with torch.no_grad():
            for layer in model.decoder.layers:
                layer.self_attention.linear_qkv.weight.mul_(10.0)
        logits = megatron_io.megatron_logits(model, tokens())
        megatron_io.save_model_checkpoint(model, args, str(tmp / "sharp"), common["vocab_size"],
                                          common["padded_vocab_size"])
    export_to_hf(str(tmp / "sharp"), str(tmp / "hf"))
    return dict(tmp=tmp, ckpt=tmp / "sharp", hf=tmp / "hf", logits=logits)


def test_rotary_base_and_gqa_grouping(sharp):
    model = hf_model(sharp["hf"])
    assert model.config.rope_parameters["rope_theta"] == 5000.0
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    got = hf_logits(sharp["hf"])
    torch.testing.assert_close(got, sharp["logits"], **TOL)

    from transformers import LlamaForCausalLM

    config = model.config.to_dict()
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    wrong_base = LlamaForCausalLM(type(model.config).from_dict(config)).eval()
    wrong_base.load_state_dict(model.state_dict())
    swapped = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("k_proj", "v_proj"):  # key/value head 0 <-> 1 in layer 0 (16 rows each)
        w = swapped[f"model.layers.0.self_attn.{name}.weight"]
        swapped[f"model.layers.0.self_attn.{name}.weight"] = torch.cat([w[16:], w[:16]])
    model.load_state_dict(swapped)
    with torch.no_grad():
        assert max_diff(wrong_base(tokens()).logits, sharp["logits"]) > 1e-3  # the base matters here
        assert max_diff(model(tokens()).logits, sharp["logits"]) > 1e-3  # so does the grouping


def test_interleaved_rotary_exports_by_reordering_qk_rows(sharp):
    """megatron-core's rotary_interleaved rotates pairs (2i, 2i+1); Llama rotates halves. The same
    weights under the two conventions are different functions; the export reorders q/k rows so the
    Llama model computes the interleaved one."""
    from transformers import LlamaForCausalLM

    from megatron_patch.model import build_gpt_model

    with megatron_io.loaded_checkpoint(str(sharp["ckpt"])) as (model, args, common):
        config = dataclasses.replace(model.config, rotary_interleaved=True)
        interleaved = build_gpt_model(config, common["padded_vocab_size"], args.max_position_embeddings,
                                      share_embeddings_and_output_weights=True, position_embedding_type="rope",
                                      transformer_impl="local", rotary_base=args.rotary_base).eval()
        interleaved.load_state_dict(model.state_dict())
        reference = megatron_io.megatron_logits(interleaved, tokens())
        state, tied = llama.megatron_to_llama_state(interleaved, config)
        hf_config = llama.llama_config(config, args, dict(common, eod=200), tied)
    assert max_diff(reference, sharp["logits"]) > 1e-3  # the convention changes this model's function
    hf = LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, reference, **TOL)


def test_te_style_extra_state_checkpoint_exports(tmp_path, monkeypatch, capsys):
    """A checkpoint whose fused QKV, attention and final norm carry TE's `_extra_state` (fp8
    metadata bytes) exports through local layers to the logits of the model that saved it."""
    from megatron_patch import model as model_module
    from tests.unit.test_checkpoint_interchange import LOCAL_LAYER_SPEC, TEStyleNorm, use_te_style_layers

    use_te_style_layers(monkeypatch)
    ckpt = train_checkpoint(tmp_path / "te")
    with megatron_io.loaded_checkpoint(str(ckpt)) as (te_model, _, _):
        assert type(te_model.decoder.final_layernorm) is TEStyleNorm  # the layers that saved it
        extra = [k for k, v in te_model.state_dict().items() if k.endswith("_extra_state") and torch.is_tensor(v)
                 and v.numel()]
        reference = megatron_io.megatron_logits(te_model, tokens())
    assert any("linear_qkv._extra_state" in k for k in extra)
    monkeypatch.setattr(model_module, "build_layer_spec", LOCAL_LAYER_SPEC)
    capsys.readouterr()
    export_to_hf(str(ckpt), str(tmp_path / "hf"))
    assert "not carried over" in capsys.readouterr().err  # the extra state was left behind, by name
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), reference, **TOL)
