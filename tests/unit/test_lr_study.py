"""studies/lr_study.py, lr_sensitivity.py: lr sensitivity as Wortsman et al. define it, its slope
against width, and a --smoke study end to end (resumed without retraining)."""

import json
import math
import os
import subprocess
import sys

import pytest

from studies import lr_sensitivity, lr_study
from tests.train_helpers import ROOT, subprocess_env


def _run(val, init=9.0):
    return {"val_loss": val, "curve": [[1, init, 1.0]], "diverged": val is None, "seconds": 1.0}


@pytest.fixture(autouse=True)
def corpus_prefix(tmp_path, monkeypatch):
    """The study refuses to plan without its corpus; these tests train nothing, so an empty
    .idx stands in for it."""
    (tmp_path / "corpus.idx").write_bytes(b"")
    monkeypatch.setenv("LR_STUDY_TEST_DATA", str(tmp_path / "corpus"))


def _args(*extra):
    return lr_study.parse_args(["--widths", "32,64", "--methods", "vanilla,scaled_embed", "--lrs",
                                "1e-3,1e-2,1e-1", "--seeds", "1,2", "--high-from", "1e-2",
                                "--data-path", os.environ["LR_STUDY_TEST_DATA"], *extra])


def test_sensitivity_is_the_mean_excess_over_the_best_capped_at_init():
    args = _args()
    results = {}
    # vanilla d32, seed 1: 6.0 at 1e-3, best 5.0 at 1e-2, non-finite at 1e-1 -> counts as init (9.0)
    for lr, v in ((1e-3, 6.0), (1e-2, 5.0), (1e-1, None)):
        results[lr_sensitivity.run_name(32, "vanilla", lr, 1)] = _run(v)
    # seed 2: a loss above init is capped at init
    for lr, v in ((1e-3, 6.5), (1e-2, 5.5), (1e-1, 12.0)):
        results[lr_sensitivity.run_name(32, "vanilla", lr, 2)] = _run(v)
    sens = lr_sensitivity.sensitivity(args, results)
    cell = sens[32, "vanilla"]
    assert cell["per_seed"] == pytest.approx([(6.0 + 5.0 + 9.0) / 3 - 5.0, (6.5 + 5.5 + 9.0) / 3 - 5.5])
    assert cell["high_side"] == pytest.approx([(5.0 + 9.0) / 2 - 5.0, (5.5 + 9.0) / 2 - 5.5])
    assert cell["best_lr"] == 1e-2 and cell["losses"][1e-1] == [9.0, 9.0]
    assert (32, "scaled_embed") not in sens and (64, "vanilla") not in sens  # no complete seed


def test_slope_against_log2_width_per_seed():
    args = _args()
    results = {}
    for width, excess in ((32, 0.2), (64, 0.5)):  # sensitivity grows 0.3 nats per doubling
        for seed in (1, 2):
            for lr in args.lrs:
                best = 5.0 + 0.01 * seed
                results[lr_sensitivity.run_name(width, "vanilla", lr, seed)] = _run(
                    best if lr == 1e-2 else best + 1.5 * excess)
    sens = lr_sensitivity.sensitivity(args, results)
    slope, per_seed = lr_sensitivity.slope_vs_width(args, sens, "vanilla")
    assert slope == pytest.approx(0.3) and per_seed == pytest.approx([0.3, 0.3])


def test_baselines_table_compares_each_method_at_its_own_best_lr():
    from studies import lr_study_report as report
    from studies import spike_sweep as sweep

    args = lr_study.parse_args(["--widths", "64", "--methods", "vanilla,wesar", "--lrs", "1e-3,1e-2",
                                "--seeds", "1", "--extra-methods-width", "64",
                                "--data-path", os.environ["LR_STUDY_TEST_DATA"]])
    # 40-step curves falling 0.1 per step (vanilla) or 0.2 (wesar) from 9.0; wesar's best lr 1e-2
    def curve(rate, floor):
        return [[i, max(9.0 - rate * i, floor), 1.0] for i in range(1, 41)]

    results = {}
    for m, rate, best_lr in (("vanilla", 0.1, 1e-3), ("wesar", 0.2, 1e-2)):
        for lr in args.lrs:
            floor = 6.0 if lr == best_lr else 7.0
            results[lr_sensitivity.run_name(64, m, lr, 1)] = dict(
                _run(floor), curve=curve(rate, floor),
                final_train_loss=sweep.summarize(curve(rate, floor), None, [], None, 1.0)["final_train_loss"],
                loss_spikes=0, grad_spikes=2 if m == "vanilla" else 0, max_grad_norm=3.0)
    lines = report.baselines_table(args, results, lr_sensitivity.sensitivity(args, results))
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| vanilla") or
            line.startswith("| wesar")}
    # target: the worse best-lr run's final 20-step mean; vanilla's curve hits 6.0 at step 30, so its
    # 20-step mean reaches its own final value only at the end (step 40)
    assert "| vanilla | 0.001 | 6.000 (n=1) | 0 / 2 | 3.0 | 40 |" == rows["vanilla"]
    assert rows["wesar"].startswith("| wesar | 0.01 | 6.000 (n=1) | 0 / 0 |")
    assert sweep.steps_to(curve(0.2, 6.0), 6.5) < 40 and sweep.steps_to(curve(0.1, 7.0), 6.5) is None


def test_vanillas_deficit_is_paired_by_seed():
    from studies import lr_study_report as report

    args = _args()
    results = {}
    for seed, (v_best, s_best) in ((1, (6.0, 5.5)), (2, (6.2, 5.9))):
        for lr in args.lrs:
            for m, best in (("vanilla", v_best), ("scaled_embed", s_best)):
                results[lr_sensitivity.run_name(32, m, lr, seed)] = _run(best if lr == 1e-2 else best + 1.0)
    results[lr_sensitivity.run_name(64, "vanilla", 1e-3, 1)] = _run(6.0)  # d 64 incomplete: no cell
    lines = report.deficit_table(args, lr_sensitivity.sensitivity(args, results))
    assert "| d 32 | +0.400 ± 0.141 (n=2) |" in lines and "| d 64 |  |" in lines


def test_wesar_init_sigma_uses_the_small_init_sigma_of_its_width():
    argv = lr_study.run_argv(_args(), 128, "wesar_init_sigma", 1e-3, 1, "/tmp/x")
    assert argv[argv.index("--wesar-init-std") + 1] == str(round(math.sqrt(2 / (5 * 128)), 7))
    he = lr_study.run_argv(_args(), 128, "wesar_he", 1e-3, 1, "/tmp/x")
    assert he[he.index("--wesar-targets") + 1] == "he" and he[he.index("--num-attention-heads") + 1] == "4"


def test_smoke_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "studies.lr_study", "--smoke", "--methods",
           "vanilla,wesar_init_sigma", "--out", str(out), "--jobs", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    # vanilla at both widths, WeSaR at the extra width only; 2 lrs each
    assert sorted(runs) == sorted(lr_sensitivity.run_name(d, m, lr, 1) for d, m in
                                  ((32, "vanilla"), (64, "vanilla"), (64, "wesar_init_sigma")) for lr in (1e-3, 1e-2))
    table = (out / "table.md").read_text()
    assert "| d 64 | " in table and "Slope of lr sensitivity" in table and "| vanilla | " in table
    for png in ("final_loss_vs_lr.png", "lr_sensitivity_vs_width.png"):
        assert (out / png).stat().st_size > 0
    again = subprocess.run(cmd + ["--no-plots"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "6 runs done, 0 to train" in again.stdout
