"""Checkpoints cross between Transformer Engine (TE) and megatron-core's local layers, and
between CPU and GPU runs.

TE cannot be installed here, so its checkpoint differences are reproduced with the exact
mechanism TE uses: modules that carry `_extra_state` (TE keeps fp8 metadata there). As under TE,
the block's final norm and the attention get one, and the fused QKV linear holds fp8 content.
The weight names need no mapping: megatron-core's local spec already saves its norms under
TE's names (`sharded_state_dict_keys_map`), which the first test pins down.
"""

import copy

import pytest
import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_patch import model as model_module
from megatron_patch.training.callbacks import Callback
from megatron_patch.training.errors import SetupError
from tests.train_helpers import losses, make_corpus, run_inprocess, tiny_args


class _FP8Meta:
    """TE-style extra state: a uint8 tensor, non-empty when fp8 metadata is kept."""

    fp8_bytes = 0

    def get_extra_state(self):
        return torch.arange(self.fp8_bytes, dtype=torch.uint8)

    def set_extra_state(self, state):
        self.loaded_extra_state = state


class TEStyleAttention(_FP8Meta, DotProductAttention):
    fp8_bytes = 4  # megatron-core never puts core_attention's extra state in a checkpoint


class TEStyleQKV(_FP8Meta, ColumnParallelLinear):
    fp8_bytes = 8


class TEStyleNorm(_FP8Meta, torch.nn.LayerNorm):
    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__(hidden_size, eps=eps)


LOCAL_LAYER_SPEC = model_module.build_layer_spec


def use_te_style_layers(monkeypatch):
    """Make the trainer build the TE-style model (local compute, TE's extra-state layout)."""

    def build(config, transformer_impl="local", vp_stage=None):
        spec = copy.deepcopy(LOCAL_LAYER_SPEC(config, transformer_impl, vp_stage))
        attention = spec.submodules.self_attention.submodules
        attention.core_attention, attention.linear_qkv = TEStyleAttention, TEStyleQKV
        return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                          layer_norm=TEStyleNorm)

    monkeypatch.setattr(model_module, "build_layer_spec", build)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("interchange") / "data" / "tiny_text_document")


def run(corpus, *extra, iters=6):
    return run_inprocess(tiny_args("--train-iters", iters, *extra, data=corpus))


def test_local_layers_save_under_transformer_engine_names(mcore):
    from megatron_patch.config import StabilityConfig

    cfg = StabilityConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True)
    keys = {v.key for v in model_module.build_gpt_model(cfg, 128, 32, transformer_impl="local")
            .sharded_state_dict().values()}
    # TELayerNormColumnParallelLinear's parameters in megatron-core's TE layer spec
    for te_name in ("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                    "decoder.layers.self_attention.linear_qkv.layer_norm_bias",
                    "decoder.layers.mlp.linear_fc1.layer_norm_weight",
                    "decoder.layers.mlp.linear_fc1.layer_norm_bias",
                    "decoder.layers.self_attention.linear_qkv._extra_state"):
        assert te_name in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)


def test_local_checkpoint_resumes_into_te_layers_and_back(corpus, tmp_path, monkeypatch, capsys):
    local = run(corpus, "--save", tmp_path / "local", "--save-interval", 3)
    use_te_style_layers(monkeypatch)
    capsys.readouterr()
    te = run(corpus, "--load", tmp_path / "local", "--ckpt-step", 3, "--save", tmp_path / "te", "--exit-interval", 4)
    out = capsys.readouterr().out
    assert "not carried over: extra state of decoder.final_layernorm (not in the checkpoint" in out
    assert losses(te) == losses(local)[3:4]  # extra state does not change what is computed

    monkeypatch.setattr(model_module, "build_layer_spec", LOCAL_LAYER_SPEC)
    back = run(corpus, "--load", tmp_path / "te")
    out = capsys.readouterr().out
    assert "extra state of decoder.final_layernorm (in the checkpoint, not in this model)" in out
    assert "fp8 metadata of decoder.layers.*.self_attention.linear_qkv" in out
    assert losses(back) == losses(local)[4:]


def test_te_checkpoint_evaluates_and_exports_through_local_layers(corpus, tmp_path, monkeypatch, capsys):
    from megatron_patch.export import megatron_io

    use_te_style_layers(monkeypatch)
    run(corpus, "--save", tmp_path / "te", "--save-interval", 6, "--no-save-optim")
    monkeypatch.setattr(model_module, "build_layer_spec", LOCAL_LAYER_SPEC)
    with megatron_io.loaded_checkpoint(str(tmp_path / "te")) as (model, _, common):
        assert type(model.decoder.final_layernorm) is not TEStyleNorm  # export/eval build local layers
    assert "not carried over" in capsys.readouterr().err


def test_a_weight_missing_from_the_checkpoint_is_named(mcore, tmp_path):
    """The last line of defence behind the flag comparison on resume (evaluation and export load
    without one): a tensor this model needs and the checkpoint lacks is named."""
    from megatron.core import dist_checkpointing

    from megatron_patch.compat.dist_checkpointing import use_in_process_results_queue
    from megatron_patch.config import StabilityConfig
    from megatron_patch.training import checkpoint_keys

    use_in_process_results_queue()
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True)
    plain = model_module.build_gpt_model(StabilityConfig(**shape), 128, 32, transformer_impl="local")
    dist_checkpointing.save({"model0": plain.sharded_state_dict()}, str(tmp_path))
    qk = model_module.build_gpt_model(StabilityConfig(**shape, qk_layernorm=True), 128, 32, transformer_impl="local")
    with pytest.raises(SetupError, match="lacks decoder.layers.self_attention.k_layernorm.bias, "
                                         "decoder.layers.self_attention.k_layernorm.weight"):
        checkpoint_keys.load_sharded({"model0": qk.sharded_state_dict()}, str(tmp_path))


def test_rng_saved_on_another_device_is_reseeded(corpus, tmp_path, monkeypatch, capsys):
    """A CPU generator state is no CUDA one: restoring it across device types would fail or feed
    the GPU's dropout garbage. The device streams are reseeded from --seed instead."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_patch.training import initialize, rng_state

    dropout = ("--hidden-dropout", 0.1, "--attention-dropout", 0.1)  # so the tracker's states move
    monkeypatch.setattr(rng_state, "device", lambda: "cuda")  # as saved by a GPU run
    run(corpus, *dropout, "--save", tmp_path / "gpu", "--exit-interval", 3, iters=4)
    monkeypatch.undo()

    seen = {}

    class Capture(Callback):
        def on_train_start(self, state):
            seen["loaded"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
            initialize.seed_device_rng(1234)
            seen["fresh"] = get_cuda_rng_tracker().get_states()
            get_cuda_rng_tracker().set_states(dict(seen["loaded"]))  # training then moves its own copy

    capsys.readouterr()
    run_inprocess(tiny_args("--train-iters", 4, *dropout, "--load", tmp_path / "gpu", data=corpus),
                  callbacks=[Capture()])
    assert "RNG states were saved on cuda, this run is on cpu" in capsys.readouterr().out
    assert all(torch.equal(seen["loaded"][k], seen["fresh"][k]) for k in seen["fresh"])
