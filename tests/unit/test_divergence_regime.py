"""studies/divergence_regime.py: each regime's flags reach the trainer, and a smoke run end to end."""

import json
import subprocess
import sys

import pytest

from studies import divergence_regime as regime
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
    assert _flag(small, "--adam-beta2") == str(args.recipe.adam_beta2)
    beta = regime.run_argv(args, "no_clip_high_lr_beta2_0.95", "vanilla", 1, "/tmp/r")
    assert _flag(beta, "--adam-beta2") == "0.95" and "beta2 0.95" in regime.describe(args, "no_clip_high_lr_beta2_0.95")
    wide = regime.run_argv(args, "no_clip_high_lr_d128", "vanilla", 1, "/tmp/r")
    assert _flag(wide, "--hidden-size") == "128" and _flag(wide, "--num-attention-heads") == "4"
    assert len(regime.plan(args)[1]) == 3 * len(regime.REGIMES) * len(regime.METHODS)


def test_smoke_regime_end_to_end(tmp_path):
    out = tmp_path / "regime"
    cmd = [sys.executable, "-m", "studies.divergence_regime", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(runs) == ["big_sigma_embed_layernorm_s1", "big_sigma_vanilla_s1"]
    assert all(r["steps"] == 6 for r in runs.values())
    table = (out / "table.md").read_text()
    assert "| big_sigma | d 64, lr 0.01, 6 steps, sigma 0.0088, clip 1 | vanilla | 1 | 0/1 |" in table
    assert (out / "loss_curves.png").stat().st_size > 0


def _corpus(prefix, docs):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.array(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_unigram_loss_and_the_stalled_share(tmp_path):
    import math

    prefix = str(tmp_path / "corpus")
    _corpus(prefix, [[0, 1, 0, 1], [2, 2, 3, 3]])  # four tokens, equally frequent: ln 4
    assert regime.unigram_loss(prefix) == pytest.approx(math.log(4))
    args = regime.parse_args(["--regimes", "no_clip_high_lr", "--methods", "vanilla,scaled_embed",
                              "--seeds", "1,2", "--data-path", prefix, "--escape-margin", "0.5"])
    level = math.log(4) - 0.5  # 0.886

    def run(curve):
        return dict(curve=[[i + 1, v, 1.0] for i, v in enumerate(curve)], diverged=False, loss_spikes=0,
                    grad_spikes=0, max_grad_norm=1.0, final_train_loss=curve[-1], val_loss=curve[-1], seconds=1.0)

    flat, late, early = [1.4] * 1000, [1.4] * 700 + [0.5] * 300, [1.4] * 10 + [0.5] * 990
    results = {"no_clip_high_lr_vanilla_s1": run(flat), "no_clip_high_lr_vanilla_s2": run(late),
               "no_clip_high_lr_scaled_embed_s1": run(early), "no_clip_high_lr_scaled_embed_s2": run(early)}
    rows = [line for line in regime.table(args, results, 0.0).splitlines() if line.startswith("| no_clip")]
    # vanilla: seed 1 never leaves, seed 2 leaves after half the run (step 500): both stalled;
    # the 20-step mean of `late` first falls below 0.886 at step 700 + 12
    assert "| vanilla | 2 | 0/2 | 0/2 | 2/2 |" in rows[0] and "| -, 712 |" in rows[0]
    assert "| scaled_embed | 2 | 0/2 | 0/2 | 0/2 |" in rows[1] and "| 22, 22 |" in rows[1]
    assert rows[1].endswith("| 0.500 ± 0.000 | 0.500 ± 0.000 |")
    assert f"{level:.3f}" in regime.table(args, results, 0.0)
