"""studies/spike_sweep.py: the --smoke sweep end to end, and how runs are judged."""

import json
import math
import subprocess
import sys

import pytest

from studies import spike_sweep as sweep
from tests.train_helpers import ROOT, subprocess_env


def test_smoke_sweep_trains_every_method_and_writes_table_and_plots(tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "studies.spike_sweep", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r.split("_lr")[0] for r in runs) == sorted(sweep.METHODS)
    for r in runs.values():
        assert r["steps"] == 6 and not r["diverged"] and math.isfinite(r["val_loss"])
        assert len(r["curve"]) == 6 and r["loss_spikes"] == r["grad_spikes"] == 0
    table = (out / "table.md").read_text()
    assert "| validation loss (mean ± sd over seeds" in table and "| largest gradient norm" in table
    for method in sweep.METHODS:
        assert f"| {method} | " in table
    for png in ("loss_curves.png", "loss_by_lr.png", "val_loss_vs_lr.png"):
        assert (out / png).stat().st_size > 0
    # Each method's flags reached the model: the runs differ (Embed LN changes the very first loss).
    losses = {name: r["curve"][0][1] for name, r in runs.items()}
    assert len({round(v, 5) for v in losses.values()}) > 1
    # A finished run is not trained again.
    again = subprocess.run(cmd + ["--no-plots"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and f"{len(sweep.METHODS)} runs already done, 0 to train" in again.stdout


def _curve(losses):
    return [(i + 1, x, 1.0) for i, x in enumerate(losses)]


def test_a_one_step_spike_that_recovers_is_not_divergence():
    losses = [8.0 - 0.01 * i for i in range(100)]
    losses[50] = 12.0
    s = sweep.summarize(_curve(losses), 7.0, [], None, margin=1.0)
    assert not s["diverged"] and s["nonfinite_steps"] == 0


def test_a_loss_that_climbs_and_stays_up_is_divergence():
    losses = [8.0 - 0.02 * i for i in range(100)] + [9.0] * 40
    s = sweep.summarize(_curve(losses), 9.0, [], None, margin=1.0)
    assert s["diverged"]


def test_non_finite_losses_stop_the_run_and_count_as_divergence():
    rec = sweep.Recorder(patience=3)

    class State:
        iteration, loss, grad_norm = 1, float("nan"), None

    rec.on_step_end(State)
    rec.on_step_end(State)
    with pytest.raises(sweep.Diverged):
        rec.on_step_end(State)
    s = sweep.summarize(rec.curve, None, [], "stopped", margin=1.0)
    assert s["diverged"] and s["val_loss"] is None and s["nonfinite_steps"] == 3


def test_spikes_are_read_from_the_monitor_log(tmp_path):
    records = [{"iteration": 1, "loss": 8.0},
               {"iteration": 2, "loss": 12.0, "spikes": [{"iteration": 2, "metric": "loss"},
                                                         {"iteration": 2, "metric": "grad_norm"}]},
               {"iteration": 3, "loss": 8.0, "spikes": [{"iteration": 3, "metric": "grad_norm"}]}]
    (tmp_path / "monitor.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    s = sweep.summarize(_curve([8.0, 12.0, 8.0]), 8.0, sweep.read_spikes(str(tmp_path)), None, margin=1.0)
    assert (s["loss_spikes"], s["grad_spikes"], s["first_spike"]) == (1, 2, 2)


def test_unknown_method_is_one_line_error(capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--smoke", "--methods", "vanilla,magic"])
    assert "unknown method(s) magic" in capsys.readouterr().err
