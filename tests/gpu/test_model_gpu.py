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
    from megatron_patch.config import StabilityConfig, StabilityConfigError
    from megatron_patch import capabilities
    from megatron_patch.model import build_gpt_model

    if impl == "transformer_engine" and not capabilities.detect().transformer_engine:
        pytest.skip("Transformer Engine is not installed")
    cfg = StabilityConfig(**SHAPE, **options)
    if impl == "transformer_engine" and options.get("wesar"):
        with pytest.raises(StabilityConfigError):
            build_gpt_model(cfg, 256, 32, transformer_impl=impl)
        return
    model = build_gpt_model(cfg, 256, 32, transformer_impl=impl).cuda()
    ids, pos = _batch()
    loss = model(ids, pos, None, labels=ids).mean()
    loss.backward()
    assert torch.isfinite(loss)
    if options.get("scaled_embed"):
        out = model.embedding(input_ids=ids, position_ids=pos)
        expected = math.sqrt(128) * math.sqrt(2) * cfg.embedding_init_method_std
        assert out.std().item() == pytest.approx(expected, rel=0.1)
