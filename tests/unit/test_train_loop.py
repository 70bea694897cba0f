"""The training loop on megatron-core's schedules: learning, golden curve, logs, callbacks.

Golden curve: tests/golden/tiny_gpt_losses.json holds the first losses of a fixed tiny run. A
change that alters them fails `test_golden_curve`. To accept a deliberate change, regenerate:

    PYTHONPATH=. python -m tests.unit.test_train_loop --regenerate-golden
"""

import json
import math
import sys
from pathlib import Path

import pytest

from megatron_patch.training.callbacks import Callback
from tests.train_helpers import losses, make_corpus, run_inprocess, tiny_args

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_gpt_losses.json"
GOLDEN_ITERS = 10
GOLDEN_RTOL = 2e-5  # fp32 CPU kernels may differ in the last bits across CPUs/torch builds


def golden_argv(corpus_prefix):
    return tiny_args("--train-iters", 40, "--eval-interval", 20, "--eval-iters", 2,
                     "--log-interval", 10, data=corpus_prefix)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 40-iteration run on the learnable corpus, with a recording callback."""
    corpus = make_corpus(tmp_path_factory.mktemp("corpus") / "tiny_text_document")
    recorder = Recorder()
    ctx = run_inprocess(golden_argv(corpus), callbacks=[recorder])
    return ctx, recorder


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, state):
        self.events.append(("start", state.iteration))

    def on_before_optimizer_step(self, state):
        self.events.append(("before", state.iteration, state.loss, state.current_grad_norm()))

    def on_step_end(self, state):
        self.events.append(("end", state.iteration, state.loss, state.grad_norm, state.skipped))

    def on_eval_end(self, state, metrics):
        self.events.append(("eval", state.iteration, metrics["lm loss"], metrics["ppl"]))

    def on_train_end(self, state):
        self.events.append(("stop", state.iteration))


def test_tiny_model_learns_the_corpus(trained):
    ctx, _ = trained
    curve = losses(ctx)
    assert len(curve) == 40 and all(math.isfinite(x) for x in curve)
    first, last = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert first > 5.0 and last < first - 1.5, curve  # ln(256) ~ 5.5 -> well below 4


def test_golden_curve(trained):
    ctx, _ = trained
    golden = json.loads(GOLDEN.read_text())
    got = losses(ctx)[:GOLDEN_ITERS]
    for i, (g, x) in enumerate(zip(golden["losses"], got), 1):
        assert math.isclose(g, x, rel_tol=GOLDEN_RTOL), (
            f"iteration {i}: loss {x!r} != golden {g!r}. If this change is intended, regenerate with "
            f"`{golden['regenerate']}` and commit tests/golden/tiny_gpt_losses.json")


def test_callbacks_see_every_step_and_grad_norm_matches_optimizer(trained):
    ctx, rec = trained
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    assert kinds.count("before") == kinds.count("end") == 40
    before = [e for e in rec.events if e[0] == "before"]
    end = [e for e in rec.events if e[0] == "end"]
    for b, e in zip(before, end):
        assert b[1] == e[1] and b[2] == e[2]
        assert math.isclose(b[3], e[3], rel_tol=1e-5)  # pre-clip norm the optimizer reports
    evals = [e for e in rec.events if e[0] == "eval"]
    assert [e[1] for e in evals][:2] == [20, 40]
    assert all(math.isclose(ppl, math.exp(loss), rel_tol=1e-6) for _, _, loss, ppl in evals)


def test_callback_can_skip_an_update(tmp_path):
    class SkipSecond(Callback):
        def on_before_optimizer_step(self, state):
            return state.iteration == 2

    argv = tiny_args("--train-iters", 3, mock=True)
    ref = run_inprocess(argv)
    ctx = run_inprocess(argv, callbacks=[SkipSecond()])
    skipped = [h["skipped"] for h in ctx.history]
    assert skipped == [False, True, False]
    curve, ref_curve = losses(ctx), losses(ref)
    assert curve[:2] == ref_curve[:2]
    assert curve[2] == curve[2] and curve[2] != ref_curve[2]  # step 2's update was not applied


def test_log_lines_tensorboard_and_wandb(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tb = tmp_path / "tb"
    run_inprocess(tiny_args("--train-iters", 4, "--log-interval", 2, "--eval-interval", 2,
                            "--eval-iters", 1, "--tensorboard-dir", tb, "--peak-tflops", 1.0,
                            "--log-validation-ppl-to-tensorboard", "--wandb-project", "tiny",
                            "--wandb-exp-name", "t1", "--wandb-save-dir", tmp_path / "wb", mock=True))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "| consumed samples:" in line]
    assert len(lines) == 2
    for field in ("iteration        4/       4 |", "consumed samples:           32 |",
                  "elapsed time per iteration (ms):", "learning rate: ", "global batch size:     8 |",
                  "lm loss: ", "loss scale: 1.0 |", "grad norm: ", "number of skipped iterations:   0 |",
                  "number of nan iterations:   0 |", "tokens per second: ", "TFLOP/s per device: ",
                  "MFU: ", "memory (MiB): "):
        assert field in lines[1]
    assert " validation loss at iteration 2 | lm loss value: " in out and "lm loss PPL: " in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "lm loss validation", "lm loss validation ppl",
            "tokens-per-second"} <= tags
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3, 4]
    assert list((tmp_path / "wb").rglob("*.wandb")), "no offline wandb run written"


def regenerate_golden():
    import tempfile

    from megatron_patch.training.pretrain import run

    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp) / "tiny_text_document")
        ctx = run(golden_argv(corpus))
    GOLDEN.write_text(json.dumps({
        "what": "first losses of tests/unit/test_train_loop.py::golden_argv on make_corpus(seed=0), CPU fp32",
        "regenerate": "PYTHONPATH=. python -m tests.unit.test_train_loop --regenerate-golden",
        "losses": losses(ctx)[:GOLDEN_ITERS]}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__" and "--regenerate-golden" in sys.argv:
    regenerate_golden()


def test_history_keeps_a_bounded_window():
    from megatron_patch.training.loop import BoundedHistory

    history = BoundedHistory(maxlen=3)
    for i in range(1, 6):
        history.append({"iteration": i})
    assert [h["iteration"] for h in history] == [3, 4, 5] and history[1:] == [{"iteration": 4}, {"iteration": 5}]


def test_callbacks_subclass_the_base_and_divergence_is_not_a_setup_error():
    from megatron_patch.training.callbacks import CallbackList
    from megatron_patch.training.errors import SetupError, TrainingDiverged

    class Duck:
        def on_step_end(self, state):
            pass

    with pytest.raises(TypeError, match="Duck is not a megatron_patch.training.callbacks.Callback"):
        CallbackList([Duck()])
    assert CallbackList([Callback()]).on_before_optimizer_step(None) is False  # the base's hooks do nothing
    assert not issubclass(TrainingDiverged, SetupError)
