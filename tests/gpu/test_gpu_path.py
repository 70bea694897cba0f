"""The GPU path for real (skipped without CUDA): Transformer Engine checkpoints across layer
implementations, gradient-accumulation fusion, CUDA_DEVICE_MAX_CONNECTIONS, the RNG across devices."""

import pytest
import torch

from megatron_patch import capabilities
from tests.train_helpers import losses, make_corpus, run_inprocess, tiny_args

pytestmark = pytest.mark.gpu


def needs_te():
    if not capabilities.detect().transformer_engine:
        pytest.skip("Transformer Engine is not installed")


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "c" / "tiny_text_document")


def test_te_layers_are_the_default_and_fuse_gradient_accumulation(corpus):
    needs_te()
    ctx = run_inprocess(tiny_args("--train-iters", 4, "--bf16", data=corpus))
    assert ctx.args.transformer_impl == "transformer_engine"
    assert ctx.config.gradient_accumulation_fusion


def test_te_checkpoint_resumes_on_local_layers_and_back(corpus, tmp_path, capsys):
    needs_te()
    argv = ("--train-iters", 12, "--bf16")
    te = run_inprocess(tiny_args(*argv, "--save", tmp_path / "te", "--save-interval", 4, data=corpus))
    local = run_inprocess(tiny_args(*argv, "--transformer-impl", "local", "--load", tmp_path / "te",
                                    "--ckpt-step", 4, "--save", tmp_path / "local", "--exit-interval", 8,
                                    data=corpus))
    back = run_inprocess(tiny_args(*argv, "--load", tmp_path / "local", data=corpus))
    assert "not carried over" in capsys.readouterr().out
    # Same function, other kernels (fused attention vs local): close, not bit-equal.
    for a, b in zip(losses(local) + losses(back), losses(te)[4:]):
        assert abs(a - b) < 2e-2
    assert len(losses(local)) == 4 and len(losses(back)) == 4


def test_cpu_checkpoint_resumes_on_the_gpu_with_reseeded_dropout(corpus, tmp_path, monkeypatch, capsys):
    from megatron_patch.training import rng_state

    monkeypatch.setattr(rng_state, "device", lambda: "cpu")  # as a CPU run saves it
    run_inprocess(tiny_args("--train-iters", 6, "--hidden-dropout", 0.1, "--save", tmp_path / "cpu",
                            "--exit-interval", 3, data=corpus))
    monkeypatch.undo()
    resumed = run_inprocess(tiny_args("--train-iters", 6, "--hidden-dropout", 0.1, "--load", tmp_path / "cpu",
                                      data=corpus))
    assert "RNG states were saved on cpu, this run is on cuda" in capsys.readouterr().out
    assert all(torch.isfinite(torch.tensor(losses(resumed))))


def test_tensor_parallel_sets_cuda_device_max_connections(monkeypatch):
    from megatron_patch.training.arguments import parse_and_validate

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    args = parse_and_validate([str(a) for a in tiny_args("--train-iters", 4, "--tensor-model-parallel-size", 2,
                                                         mock=True)], world_size=2)
    env = {}
    capabilities.set_device_max_connections(args, environ=env)
    expected = "1" if capabilities.detect().arch_major < 10 else None
    assert env.get("CUDA_DEVICE_MAX_CONNECTIONS") == expected
