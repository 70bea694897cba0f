"""Start-up guards, CLI flags, and that every new parameter survives a checkpoint round trip."""

import argparse

import pytest
import torch

from megatron_patch.config import (
    StabilityConfig,
    StabilityConfigError,
    stability_kwargs,
)
from megatron_patch.model import build_gpt_model
from megatron_patch.stability_flags import add_stability_args

SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)


@pytest.mark.parametrize("options, message", [
    (dict(scaled_embed=True, embed_layernorm=True), "one embedding treatment"),
    (dict(embed_layernorm=True, embed_detach_alpha=0.1), "one embedding treatment"),
    (dict(embed_detach_alpha=0.0), "embed_detach_alpha"),
    (dict(embed_detach_alpha=1.5), "embed_detach_alpha"),
    (dict(scaled_embed=True, embedding_init_method_std=1.0), "one or the other"),
    (dict(init_style="kaiming"), "init_style"),
    (dict(wesar=True, wesar_init_std=-1.0), "wesar_init_std"),
    (dict(wesar_targets="he"), "only apply with wesar"),
    (dict(wesar=True, attention_output_gate=True), "wesar_fused_qkv_gate"),
    (dict(scaled_embed=True, multi_latent_attention=True), "MLA"),
    (dict(wesar=True, num_moe_experts=4), "MoE"),
    (dict(scaled_embed=True, mtp_num_layers=1), "multi-token"),
])
def test_contradictions_are_refused(options, message):
    with pytest.raises(StabilityConfigError, match=message):
        StabilityConfig(**SHAPE, **options)


def parse(argv):
    parser = add_stability_args(argparse.ArgumentParser())
    parser.add_argument("--init-method-std", type=float, default=None)
    return stability_kwargs(parser.parse_args(argv))


def test_cli_flags_map_to_fields():
    assert parse([]) == dict(init_style="scaled", small_init=False, scaled_embed=False,
                             embed_layernorm=False, embed_detach_alpha=None, wesar=False,
                             wesar_init_std=None, z_loss_coeff=0.0, wesar_targets="init",
                             wesar_fused_qkv_gate=False, wesar_gate_output_layer=True,
                             wesar_embedding_common_std=False, wesar_gate_side="auto")
    kw = parse(["--wesar", "--wesar-targets", "he", "--wesar-fused-qkv-gate", "--wesar-no-output-gate",
                "--wesar-embedding-common-std"])
    assert kw["wesar_targets"] == "he" and kw["wesar_fused_qkv_gate"] and kw["wesar_embedding_common_std"]
    assert kw["wesar_gate_output_layer"] is False
    assert parse(["--z-loss-coeff", "1e-4"])["z_loss_coeff"] == 1e-4
    assert parse(["--embed-detach-alpha"])["embed_detach_alpha"] == 0.1
    assert parse(["--embed-detach-alpha", "0.3"])["embed_detach_alpha"] == 0.3
    kw = parse(["--scaled-embed", "--init-style", "plain", "--small-init", "--wesar",
                "--wesar-init-std", "0.006"])
    assert kw["scaled_embed"] and kw["small_init"] and kw["wesar"]
    assert kw["init_style"] == "plain" and kw["wesar_init_std"] == 0.006
    with pytest.raises(StabilityConfigError, match="--small-init"):
        parse(["--small-init", "--init-method-std", "0.02"])
    with pytest.raises(StabilityConfigError, match="needs --wesar"):
        parse(["--wesar-init-std", "0.01"])
    with pytest.raises(StabilityConfigError, match="--wesar-fused-qkv-gate needs --wesar"):
        parse(["--wesar-fused-qkv-gate"])


@pytest.mark.parametrize("options, new_names", [
    (dict(embed_layernorm=True, wesar=True), ("embedding.stabilizer.norm.weight", "wesar_gate")),
])
def test_state_dict_round_trip_keeps_new_parameters(mcore, tmp_path, options, new_names):
    torch.manual_seed(0)
    model = build_gpt_model(StabilityConfig(**SHAPE, **options), 64, 16)
    with torch.no_grad():  # make the new parameters differ from their init
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    fresh = build_gpt_model(StabilityConfig(**SHAPE, **options), 64, 16)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    saved = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, saved[name]), name
    for new in new_names:
        assert any(new in n for n in saved), new
    # The distributed-checkpoint view (used by the trainer) carries them too.
    sharded = model.sharded_state_dict()
    for new in new_names:
        assert any(new in k for k in sharded), new
