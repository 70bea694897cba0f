"""fp16 and bf16 on CPU, through megatron-core's own Float16Module, fp32 main params and grad
scaler (the GPU's code path, slowly): Megatron-LM's precision rules, a loss scale that settles,
fp32 gradient reduction under bf16, an exact fp16 resume, and evaluation/export of the result."""

import math
import types

import pytest
import torch

from megatron_patch.training.arguments import parse_and_validate
from megatron_patch.training.errors import SetupError
from tests.train_helpers import make_corpus, run_inprocess, tiny_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("mp") / "data" / "tiny_text_document")


def validate(*extra):
    return parse_and_validate([str(a) for a in tiny_args("--train-iters", 4, *extra, mock=True)])


def test_megatron_lm_precision_rules():
    assert validate("--fp16").check_for_nan_in_loss_and_grad is False  # dynamic scaling: Inf is a signal
    assert validate("--fp16", "--loss-scale", 1024).check_for_nan_in_loss_and_grad is True  # static
    assert validate().check_for_nan_in_loss_and_grad is True
    assert validate("--bf16").accumulate_allreduce_grads_in_fp32 is True
    assert validate("--bf16", "--grad-reduce-in-bf16").accumulate_allreduce_grads_in_fp32 is False
    assert validate("--fp16").accumulate_allreduce_grads_in_fp32 is False  # as Megatron-LM
    for bad, named in ((["--grad-reduce-in-bf16"], "needs --bf16"), (["--loss-scale", 8], "needs --fp16"),
                       (["--fp16", "--bf16"], "exclusive")):
        with pytest.raises(SetupError, match=named):
            validate(*bad)


def fp16_run(corpus, *extra, iters=40):
    return run_inprocess(tiny_args("--train-iters", iters, "--fp16", *extra, data=corpus))


def test_fp16_loss_scale_settles_and_loss_falls(corpus):
    history = fp16_run(corpus).history
    scales = [h["loss_scale"] for h in history]
    skipped = [h["skipped"] for h in history]
    assert scales[0] == 2.0 ** 32 and any(skipped[:5])  # 2^32 overflows at once
    first_update = skipped.index(False)
    assert all(skipped[:first_update]) and scales[first_update] < 2.0 ** 20
    assert not any(skipped[-10:]) and len(set(scales[-10:])) == 1  # settled
    losses = [h["loss"] for h in history if not h["skipped"]]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_bf16_reduces_gradients_in_fp32(corpus):
    ctx = run_inprocess(tiny_args("--train-iters", 20, "--bf16", data=corpus))
    ddp = ctx.model[0]
    assert ddp.ddp_config.grad_reduce_in_fp32
    assert {b.grad_dtype for b in ddp.buffers} == {torch.float32}
    assert {b.param_dtype for b in ddp.buffers} == {torch.bfloat16}
    losses = [h["loss"] for h in ctx.history]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_fp16_resume_is_bit_exact_with_the_scaler_state(corpus, tmp_path):
    full = fp16_run(corpus, "--save", tmp_path / "ckpt", "--save-interval", 8, iters=24).history
    assert full[7]["loss_scale"] != full[-1]["loss_scale"]  # saved while the scale still moves
    resumed = fp16_run(corpus, "--load", tmp_path / "ckpt", "--ckpt-step", 8, iters=24).history
    keys = ("loss", "loss_scale", "skipped", "grad_norm", "lr")
    assert [[h[k] for k in keys] for h in resumed] == [[h[k] for k in keys] for h in full[8:]]


@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_mixed_precision_checkpoint_evaluates_and_exports(corpus, tmp_path, precision):
    pytest.importorskip("transformers")
    from megatron_patch.export import megatron_io
    from megatron_patch.export.convert import export_to_hf
    from tests.unit.test_convert_checkpoint import hf_logits, tokens

    ckpt = tmp_path / "ckpt"
    run_inprocess(tiny_args("--train-iters", 20, precision, "--initial-loss-scale", 2 ** 16, "--save", ckpt,
                            "--save-interval", 20, data=corpus))
    with megatron_io.loaded_checkpoint(str(ckpt)) as (model, _, common):
        assert common["args"]["fp16" if precision == "--fp16" else "bf16"]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # evaluated in fp32
        logits = megatron_io.megatron_logits(model, tokens())
        held = torch.tensor(make_corpus_sample(), dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(
            megatron_io.megatron_logits(model, held[None, :-1])[0], held[1:]).item()
    assert loss < 4.5  # trained: ln(200) = 5.3 at init
    export_to_hf(str(ckpt), str(tmp_path / "hf"))
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), logits, rtol=1e-5, atol=1e-5)


def make_corpus_sample(vocab=200, length=33):
    """One walk of make_corpus's learnable rule t -> 3t + 7 (mod vocab)."""
    t, out = 5, []
    for _ in range(length):
        out.append(t)
        t = (3 * t + 7) % vocab
    return out


@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_deepspeed_mixed_precision_matches_the_megatron_engine(corpus, precision):
    """DeepSpeed's own loss scaler / bf16 path, fed the same flags, follows the same curve. Where
    DeepSpeed's accelerator lacks the dtype (fp16 on CPUs without oneDNN fp16 kernels), the
    scaler half of this is proven by the replay test below, which runs everywhere."""
    pytest.importorskip("deepspeed")
    from megatron_patch.capabilities import deepspeed_precision_problem
    from tests.train_helpers import ROOT

    problem = deepspeed_precision_problem(precision.lstrip("-"))
    if problem:
        pytest.skip(problem)

    argv = ["--train-iters", 24, precision]
    megatron = run_inprocess(tiny_args(*argv, data=corpus)).history
    zero1 = run_inprocess(tiny_args(*argv, "--deepspeed", "--deepspeed-config",
                                    ROOT / "examples/deepspeed/zero1.json", data=corpus)).history
    assert [h["skipped"] for h in zero1] == [h["skipped"] for h in megatron]
    assert [h["loss_scale"] for h in zero1] == [h["loss_scale"] for h in megatron]
    deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(zero1, megatron)]
    assert max(deltas) < 1e-3, deltas


def test_deepspeed_loss_scaler_from_our_flags_replays_the_megatron_scale_sequence(corpus, monkeypatch):
    """Runs on every CPU: DeepSpeed's own dynamic loss scaler, built by DeepSpeed's config parser
    from the fp16 section our flags produce, is fed the megatron engine's overflow (skipped-step)
    sequence and must give the megatron scaler's scale after every step (up to DeepSpeed's later
    growth, below). With the bf16 engine comparison above, this is what the fp16 engine
    comparison proves, less the fp16 arithmetic."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.fp16 import loss_scaler

    from megatron_patch import capabilities
    from megatron_patch.deepspeed.config import validate_deepspeed_args
    from tests.train_helpers import ROOT

    flags = ("--initial-loss-scale", 2 ** 20, "--loss-scale-window", 6, "--hysteresis", 2)
    megatron = fp16_run(corpus, *flags, iters=30).history
    assert any(h["skipped"] for h in megatron) and len({h["loss_scale"] for h in megatron}) > 2  # it moved

    # Only DeepSpeed's config parser and scaler run here, no fp16 arithmetic: the accelerator's
    # dtype question (this CPU may lack fp16 kernels) does not apply.
    monkeypatch.setattr(capabilities, "deepspeed_precision_problem", lambda precision: None)
    args = validate(*flags, "--fp16")
    args.deepspeed, args.deepspeed_config = True, str(ROOT / "examples/deepspeed/zero1.json")
    validate_deepspeed_args(args)
    fp16 = DeepSpeedConfig(args.deepspeed_config_dict).float16_config
    # The scaler asks deepspeed.comm for the rank only to log its overflow messages.
    monkeypatch.setattr(loss_scaler, "dist", types.SimpleNamespace(get_rank=lambda: 0))
    scaler = loss_scaler.CreateLossScaler(torch.half, fp16.loss_scale, fp16.loss_scale == 0,
                                          fp16.dynamic_loss_scale_args())
    replayed = []
    for h in megatron:
        scaler.update_scale(h["skipped"])
        replayed.append(scaler.cur_scale)
    # Backoff and hysteresis agree step for step. Growth does not: megatron doubles the scale on
    # the --loss-scale-window-th clean step after an overflow, DeepSpeed on the one after (its
    # stable interval excludes the current step), so each increase comes one step later there.
    scales = [h["loss_scale"] for h in megatron]
    grew = [i for i in range(1, len(scales)) if scales[i] > scales[i - 1]]
    assert grew and all(not megatron[i + 1]["skipped"] for i in grew if i + 1 < len(scales))
    one_step_later = [scales[i - 1] if i in grew else scale for i, scale in enumerate(scales)]
    assert replayed == one_step_later
