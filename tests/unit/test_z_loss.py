"""--z-loss-coeff: C * (log Z)^2 per token on the LM head's logits, against a direct computation
(value and gradients), reported apart from the cross-entropy by the trainer. TP=2 = TP=1:
tests/distributed/tp_model_worker.py."""

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.config import StabilityConfig, StabilityConfigError
from megatron_patch.model import build_gpt_model
from tests.tolerances import assert_close_up_to_summation_order
from tests.train_helpers import make_corpus, run_inprocess, tiny_args

SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
             hidden_dropout=0.0, attention_dropout=0.0)


def test_z_loss_equals_the_direct_computation_and_its_gradient(mcore):
    coeff = 0.05
    torch.manual_seed(0)
    model = build_gpt_model(StabilityConfig(**SHAPE, z_loss_coeff=coeff), 64, 16,
                            share_embeddings_and_output_weights=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).expand(2, 16)
    loss = model(ids, pos, None, labels=ids)  # [b, s]
    loss.sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids, pos, None).float()  # [b, s, v]
    direct = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(2, 16) \
        + coeff * torch.logsumexp(logits, dim=-1).square()
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.z_loss_per_token, coeff * torch.logsumexp(logits, -1).square().detach())
    direct.sum().backward()
    for name, p in model.named_parameters():
        assert_close_up_to_summation_order(ours[name], p.grad, msg=name)


def test_negative_coefficient_is_refused():
    with pytest.raises(StabilityConfigError, match="z_loss_coeff must be >= 0"):
        StabilityConfig(**SHAPE, z_loss_coeff=-1.0)


def test_trainer_reports_cross_entropy_and_z_loss_apart(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "c" / "tiny_text_document")
    plain = run_inprocess(tiny_args("--train-iters", 3, data=corpus)).history
    z = run_inprocess(tiny_args("--train-iters", 3, "--z-loss-coeff", 1e-2, data=corpus)).history
    assert z[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)  # same model and batch: CE alone
    assert all(h["z_loss"] > 0 for h in z) and all(h["z_loss"] is None for h in plain)
    assert " z loss: " in capsys.readouterr().out
