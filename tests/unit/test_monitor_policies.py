"""The stability monitor's policies where they used to fail: fp16 overflows (the scaler's, not
spikes), a rollback before the first checkpoint, a diverged run that must stop, NaN printed as
NaN. Faults are injected by a callback that runs after the gradient all-reduce, before the
monitor sees the step (as tests/distributed/monitor_worker.py does at DP=2)."""

import math

import pytest

from megatron_patch.training.loop import SKIP_MONITOR, SKIP_OVERFLOW
from megatron_patch.training.callbacks import Callback
from megatron_patch.training.errors import SetupError
from tests.train_helpers import make_corpus, one_error_line, run_inprocess, tiny_args

MONITOR = ("--spike-policy", "skip", "--spike-min-history", 8, "--spike-window", 32)


class Inject(Callback):
    """Multiply every gradient by `factor` at `steps` (once each: a rollback replays them)."""

    def __init__(self, steps, factor):
        self.steps, self.factor = set(steps), factor

    def on_before_optimizer_step(self, state):
        if state.iteration in self.steps or self.steps == {"all"}:
            self.steps.discard(state.iteration)
            for chunk in state.model:
                for p in chunk.parameters():
                    p.main_grad.mul_(self.factor)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("policies") / "data" / "tiny_text_document")


def monitor_of(ctx):
    return ctx.callbacks.callbacks[-1]


def test_fp16_overflows_go_to_the_loss_scaler_and_real_spikes_are_still_skipped(corpus):
    # fp32 gradient buffers, so that the injected x1e3 is a finite spike, not an fp16 overflow
    ctx = run_inprocess(tiny_args("--train-iters", 40, "--fp16", "--accumulate-allreduce-grads-in-fp32",
                                  *MONITOR, data=corpus), callbacks=[Inject([34], 1e3)])
    reasons = [h["skip_reason"] for h in ctx.history]
    overflows = [i + 1 for i, r in enumerate(reasons) if r == SKIP_OVERFLOW]
    assert overflows[0] == 1 and max(overflows) < 30  # the scale comes down from 2^32 ...
    assert ctx.history[-1]["loss_scale"] < 2.0 ** 20  # ... the monitor does not freeze it
    assert [i + 1 for i, r in enumerate(reasons) if r == SKIP_MONITOR] == [34]
    assert {e.iteration for e in monitor_of(ctx).spike_log} == {34}  # overflows are not spikes
    losses = [h["loss"] for h in ctx.history if h["skip_reason"] is None]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_rollback_before_the_first_checkpoint_goes_back_to_iteration_zero(corpus, tmp_path, capsys):
    ctx = run_inprocess(tiny_args("--train-iters", 30, "--spike-policy", "rollback", "--spike-min-history", 8,
                                  "--rollback-after", 3, "--rollback-window", 10, "--save", tmp_path / "ckpt",
                                  "--save-interval", 100, data=corpus), callbacks=[Inject([20, 21, 22], 1e3)])
    out = capsys.readouterr().out
    assert "rollback point: iteration 0 saved" in out
    assert ctx.rollbacks == [(22, 0)] and ctx.state.iteration == 30
    assert (tmp_path / "ckpt" / "iter_0000000").is_dir() and (tmp_path / "ckpt" / "iter_0000030").is_dir()


def test_rollback_needs_a_save_directory(capsys):
    line = one_error_line(capsys, tiny_args("--train-iters", 4, "--spike-policy", "rollback", mock=True))
    assert "--spike-policy rollback needs --save" in line


def test_a_diverged_run_stops_in_one_line_and_saves_nothing(corpus, tmp_path, capsys):
    from megatron_patch.training.pretrain import main

    argv = tiny_args("--train-iters", 40, *MONITOR, "--max-consecutive-skipped-iterations", 5,
                     "--save", tmp_path / "ckpt", "--save-interval", 100, data=corpus)
    assert main([str(a) for a in argv], callbacks=[Inject(["all"], float("nan"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iteration 5: 5 updates in a row were skipped (monitor 5" in err[0], err
    assert "no checkpoint was written" in err[0]
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


def test_consecutive_skip_limit_is_checked():
    from megatron_patch.training.arguments import parse_and_validate

    with pytest.raises(SetupError, match="max-consecutive-skipped-iterations must be >= 0"):
        parse_and_validate([str(a) for a in tiny_args("--train-iters", 4, "--max-consecutive-skipped-iterations",
                                                      -1, mock=True)])


def test_nan_validation_loss_prints_nan_perplexity(mcore, capsys):
    from megatron_patch.training.arguments import parse_and_validate
    from megatron_patch.training.logging import TrainingLogger

    args = parse_and_validate([str(a) for a in tiny_args("--train-iters", 4, mock=True)])
    ppl = TrainingLogger(args, 256, 1).log_evaluation("iteration 4", 4, float("nan"))
    assert math.isnan(ppl)
    assert "lm loss value: NAN | lm loss PPL: NAN" in capsys.readouterr().out


class UpdateProbe(Callback):
    """The applied update of each step, measured from the weights themselves."""

    def __init__(self):
        self.applied, self.read = [], []

    def on_before_optimizer_step(self, state):
        from megatron_patch.monitor.update_stats import step_lrs

        self._before = [p.detach().clone() for chunk in state.model for p in chunk.parameters()]
        self._lrs = step_lrs(state.optimizer)

    def on_step_end(self, state):
        from megatron_patch.monitor.update_stats import adam_update_norm

        after = [p.detach() for chunk in state.model for p in chunk.parameters()]
        self.applied.append(sum((a - b).double().pow(2).sum().item() for a, b in zip(after, self._before)) ** 0.5)
        self.read.append(adam_update_norm(state.optimizer, self._lrs))


@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer"]])
def test_adam_update_norm_read_from_the_state_equals_the_applied_update(corpus, extra):
    probe = UpdateProbe()  # no weight decay: the applied update is exactly Adam's
    run_inprocess(tiny_args("--train-iters", 6, "--weight-decay", 0, *extra, data=corpus), callbacks=[probe])
    assert probe.applied[0] == 0.0 and probe.read[0] == 0.0  # the warm-up starts at lr 0
    assert probe.read[1:] == pytest.approx(probe.applied[1:], rel=1e-4)


def test_update_norm_spikes_are_detected_and_recorded_per_layer(corpus, tmp_path):
    # Constant lr and no momentum: Adam's update then jumps ~5x on a 1e4x gradient (v lags, beta2 0.999).
    ctx = run_inprocess(tiny_args("--train-iters", 30, "--spike-policy", "log", "--spike-signal", "update_norm",
                                  "--spike-min-history", 8, "--monitor-interval", 10, "--monitor-update-ratio",
                                  "--monitor-dir", tmp_path, "--clip-grad", 0, "--adam-beta1", 0,
                                  "--lr-decay-style", "constant", "--lr-warmup-iters", 0, data=corpus),
                        callbacks=[Inject([25], 1e4)])
    import json

    lines = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert all("update_norm_total" in line for line in lines)
    assert [(e.iteration, e.metric) for e in monitor_of(ctx).spike_log] == [(25, "update_norm")]
    measured = [line for line in lines if line["iteration"] == 20][0]
    per_group = measured["update_norm"]
    assert math.sqrt(sum(v * v for v in per_group.values())) == pytest.approx(measured["update_norm_total"], rel=0.05)


def test_spikes_are_skipped_in_bf16(corpus):
    ctx = run_inprocess(tiny_args("--train-iters", 24, "--bf16", *MONITOR, data=corpus), callbacks=[Inject([18], 1e3)])
    assert [h["iteration"] for h in ctx.history if h["skip_reason"]] == [18]
    assert [h["skip_reason"] for h in ctx.history if h["skip_reason"]] == [SKIP_MONITOR]


def test_a_resumed_run_flags_a_spike_at_its_first_step_as_the_uninterrupted_run_does(corpus, tmp_path):
    """The detector's window is saved with the checkpoint (else a resume is blind for
    --spike-min-history steps)."""
    argv = tiny_args("--train-iters", 16, *MONITOR, data=corpus)
    full = run_inprocess(argv + ["--save", tmp_path, "--save-interval", 12], callbacks=[Inject([13], 1e3)])
    resumed = run_inprocess(argv + ["--load", tmp_path, "--ckpt-step", 12], callbacks=[Inject([13], 1e3)])
    for ctx in (full, resumed):
        assert {e.iteration for e in monitor_of(ctx).spike_log} == {13}
        assert [h["iteration"] for h in ctx.history if h["skip_reason"] == SKIP_MONITOR] == [13]
