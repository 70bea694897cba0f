"""GPU-only checks of the model options (skipped without CUDA; run on an H100/H200 machine)."""

import math
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

SHAPE = dict(num_layers=2, hidden_size=128, num_attention_heads=4, hidden_dropout=0.0,
             attention_dropout=0.0)


@pytest.fixture
def mcore_cuda():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from tests.conftest import free_port

    if not torch.distributed.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    from megatron_patch.training.initialize import teardown

    teardown()


def _batch(vocab=256, seq=32):
    ids = torch.randint(0, vocab, (2, seq), device="cuda")
    return ids, torch.arange(seq, device="cuda").expand(2, seq)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("options", [{}, dict(scaled_embed=True), dict(embed_layernorm=True),
                                     dict(embed_detach_alpha=0.1), dict(wesar=True)])
def test_options_run_on_gpu(mcore_cuda, impl, options):
    from megatron_patch.config import StabilityConfig
    from megatron_patch import capabilities
    from megatron_patch.model import build_gpt_model

    if impl == "transformer_engine" and not capabilities.detect().transformer_engine:
        pytest.skip("Transformer Engine is not installed")
    cfg = StabilityConfig(**SHAPE, **options)
    model = build_gpt_model(cfg, 256, 32, transformer_impl=impl).cuda()
    ids, pos = _batch()
    loss = model(ids, pos, None, labels=ids).mean()
    loss.backward()
    assert torch.isfinite(loss)
    if options.get("wesar"):  # gates on TE's fused linears: every gate learns, the fold keeps the function
        from megatron_patch.wesar import fold_wesar_gates, wesar_layers

        layers = wesar_layers(model)
        assert len(layers) == 4 * SHAPE["num_layers"] + 1
        assert all(layer.wesar_gate.grad is not None and bool((layer.wesar_gate.grad != 0).all())
                   for _, layer in layers)
        with torch.no_grad():
            before = model(ids, pos, None)
            fold_wesar_gates(model)
            assert torch.allclose(model(ids, pos, None), before, rtol=1e-4, atol=1e-4)
    if options.get("scaled_embed"):
        out = model.embedding(input_ids=ids, position_ids=pos)
        expected = math.sqrt(128) * math.sqrt(2) * cfg.embedding_init_method_std
        assert out.std().item() == pytest.approx(expected, rel=0.1)
