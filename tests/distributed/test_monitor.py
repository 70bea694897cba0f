"""Stability monitor under torchrun (DP=2 and TP=2, gloo): injected spikes are flagged exactly,
`skip` leaves the weights unchanged on every rank, a NaN on one rank is applied by none,
`rollback` reloads the last checkpoint and the run completes, per-layer norms add up."""

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.train_helpers import ROOT, make_corpus, subprocess_env, tiny_args, torchrun_cmd

WORKER = Path(__file__).with_name("monitor_worker.py")
MONITOR = ["--monitor-interval", "5", "--spike-window", "32", "--spike-min-history", "6",
           "--spike-zscore", "6"]


def launch(tmp_path, case, inject, *extra, tp=1):
    data = make_corpus(tmp_path / "data" / "corpus")
    out = tmp_path / f"{case}.json"
    args = tiny_args("--train-iters", 24, "--tensor-model-parallel-size", tp, *MONITOR, *extra,
                     "--monitor-dir", tmp_path / "mon", data=data)
    cmd = torchrun_cmd(WORKER, [case, out, *args, "--inject", ",".join(map(str, inject))])
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def changed(result, iteration):
    return [per_rank[str(iteration)] for per_rank in result["changed_per_rank"]]


INJECT = [12, 19]


@pytest.fixture(scope="module")
def skip_runs(tmp_path_factory):
    """The skip policy with the same injected spikes at DP=2, without and with the distributed
    optimizer (whose gradients the monitor reads from each rank's shard)."""
    runs = {}
    for name, extra in (("ddp", []), ("distopt", ["--use-distributed-optimizer"])):
        tmp = tmp_path_factory.mktemp(name)
        result, stdout = launch(tmp, "grad", INJECT, "--spike-policy", "skip", *extra)
        lines = [json.loads(line) for line in (tmp / "mon" / "monitor.jsonl").read_text().splitlines()]
        runs[name] = (result, stdout, lines)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "distopt"])
def test_skip_policy_flags_exactly_the_injected_steps_and_skips_them_everywhere(skip_runs, name):
    result, stdout, lines = skip_runs[name]
    assert result["spikes"] == INJECT
    for it in INJECT:
        assert changed(result, it) == [False, False]
    assert changed(result, 13) == [True, True]
    assert "number of skipped iterations:   1 (monitor 1)" in stdout
    # The compact jsonl has one line per step and per-layer sections on measured/spike steps.
    assert [rec["iteration"] for rec in lines] == list(range(1, 25))
    assert {rec["iteration"] for rec in lines if "grad_norm" in rec} == {5, 10, 12, 15, 19, 20}


@pytest.mark.slow
def test_distributed_optimizer_per_layer_norms_equal_the_unsharded_ones(skip_runs):
    _, _, sharded = skip_runs["distopt"]
    _, _, full = skip_runs["ddp"]
    history = {h["iteration"]: h for h in skip_runs["distopt"][0]["history"]}
    for a, b in zip(sharded, full):
        assert a["grad_norm_total"] == pytest.approx(b["grad_norm_total"], rel=1e-5)
        if "grad_norm" in a:
            assert set(a["grad_norm"]) == set(b["grad_norm"])
            for key, value in a["grad_norm"].items():
                assert value == pytest.approx(b["grad_norm"][key], rel=1e-5, abs=1e-12), key
            if a["iteration"] not in INJECT:  # and they add up to the optimizer's own norm
                total = math.sqrt(sum(v * v for v in a["grad_norm"].values()))
                assert total == pytest.approx(history[a["iteration"]]["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_nan_on_one_rank_is_applied_by_no_rank(tmp_path):
    result, _ = launch(tmp_path, "nan", [9], "--spike-policy", "log")
    assert 9 in result["spikes"]
    assert changed(result, 9) == [False, False]
    assert changed(result, 10) == [True, True]


@pytest.mark.slow
def test_rollback_reloads_the_last_checkpoint_and_completes(tmp_path):
    result, stdout = launch(tmp_path, "grad", [14, 15, 16], "--spike-policy", "rollback",
                            "--rollback-after", "3", "--rollback-window", "10", "--rollback-skip-data",
                            "--rollback-lr-factor", "0.5", "--rollback-lr-steps", "4",
                            "--save", tmp_path / "ckpt", "--save-interval", "4")
    assert result["rollbacks"] == [[16, 12]]
    assert "rollback after iteration 16 to the checkpoint of iteration 12" in stdout
    assert result["iteration"] == 24
    # Iteration 13 ran twice: before the spikes, and after the rollback with the lr halved.
    first, again = [h["lr"] for h in result["history"] if h["iteration"] == 13]
    assert again == pytest.approx(0.5 * first, rel=1e-6)
    last = {h["iteration"]: h["lr"] for h in result["history"]}
    assert last[17] > last[16]  # the cool-down ends after --rollback-lr-steps (lr jumps back up)


@pytest.mark.slow
def test_per_layer_norms_add_up_to_the_optimizer_grad_norm_at_tp2(tmp_path):
    result, _ = launch(tmp_path, "grad", [], "--spike-policy", "log", tp=2)
    lines = [json.loads(line) for line in (tmp_path / "mon" / "monitor.jsonl").read_text().splitlines()]
    history = {h["iteration"]: h for h in result["history"]}
    for line in lines:
        if "grad_norm" in line:
            total = math.sqrt(sum(v * v for v in line["grad_norm"].values()))
            assert total == pytest.approx(history[line["iteration"]]["grad_norm"], rel=1e-5)
            assert total == pytest.approx(line["grad_norm_total"], rel=1e-6)
