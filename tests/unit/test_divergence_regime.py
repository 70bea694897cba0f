"""benchmarks/divergence_regime.py: each regime's flags reach the trainer, and a smoke run end to end."""

import json
import subprocess
import sys

from benchmarks import divergence_regime as regime
from tests.train_helpers import ROOT, subprocess_env


def _flag(argv, name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last occurrence wins in argparse


def test_regime_settings_reach_the_trainer_flags(tmp_path):
    (tmp_path / "corpus.idx").write_bytes(b"")  # the plan checks the corpus exists; nothing trains
    args = regime.parse_args(["--seeds", "1,2,3", "--data-path", str(tmp_path / "corpus"), "--out", str(tmp_path)])
    argv = regime.run_argv(args, "big_sigma_no_clip", "sigma1_embedding", 2, "/tmp/r")
    assert _flag(argv, "--init-method-std") == "0.0088" and "--small-init" not in argv
    assert _flag(argv, "--clip-grad") == "0.0" and _flag(argv, "--lr") == "0.01"
    assert _flag(argv, "--hidden-size") == "64" and _flag(argv, "--embedding-init-method-std") == "1.0"
    assert _flag(argv, "--seed") == "2" and _flag(argv, "--train-iters") == "1000"
    small = regime.run_argv(args, "long_high_lr", "scaled_embed", 1, "/tmp/r")
    assert "--small-init" in small and "--scaled-embed" in small and _flag(small, "--train-iters") == "2000"
    assert len(regime.plan(args)[1]) == 3 * len(regime.REGIMES) * len(regime.METHODS)


def test_smoke_regime_end_to_end(tmp_path):
    out = tmp_path / "regime"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "divergence_regime.py"), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(runs) == ["big_sigma_embed_layernorm_s1", "big_sigma_vanilla_s1"]
    assert all(r["steps"] == 6 for r in runs.values())
    table = (out / "table.md").read_text()
    assert "| big_sigma | d 64, lr 0.01, 6 steps, sigma 0.0088, clip 1 | vanilla | 1 | 0/1 |" in table
    assert (out / "loss_curves.png").stat().st_size > 0
