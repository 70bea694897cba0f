"""SIGKILL at random moments of a run that saves every iteration (so most kills land inside a
save), again and again, each time resuming from the same --save: every iteration's loss, however
often it was redone, equals the uninterrupted run's, and the run completes. The killed trainers'
locks are taken over and their half-written iter_N.tmp directories cleaned up.

Seeded: the kill delays are drawn from random.Random(0), so a failure reproduces.
"""

import random
import subprocess
import time

import pytest

from tests.train_helpers import ROOT, logged_losses, make_corpus, pretrain_cmd, subprocess_env, tiny_args

ITERS, KILLS = 16, 5


@pytest.mark.slow
def test_random_kills_inside_saves_resume_exactly(tmp_path):
    corpus = make_corpus(tmp_path / "data" / "tiny_text_document")
    argv = tiny_args("--train-iters", ITERS, "--save-interval", 1, data=corpus)
    reference = subprocess.run(pretrain_cmd(argv), cwd=ROOT, env=subprocess_env(), capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = logged_losses(reference.stdout)
    assert sorted(expected) == list(range(1, ITERS + 1))

    save, rng, seen, killed_inside = tmp_path / "ckpt", random.Random(0), {}, 0
    resume = argv + ["--save", save, "--load", save]
    for attempt in range(KILLS + 1):
        log = tmp_path / f"attempt{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(pretrain_cmd(resume), cwd=ROOT, env=subprocess_env(), stdout=out,
                                    stderr=subprocess.STDOUT)
            if attempt < KILLS:
                deadline = time.time() + 240
                while "iteration " not in log.read_text() and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.02)  # training has started
                time.sleep(rng.uniform(0.0, 1.5))
                killed_inside += any(p.suffix == ".tmp" for p in save.glob("iter_*"))
                proc.kill()
            proc.wait(300)
        for iteration, loss in logged_losses(log.read_text()).items():
            seen.setdefault(iteration, []).append(loss)
        if attempt == KILLS:
            assert proc.returncode == 0, log.read_text()[-2000:]
    assert sorted(seen) == list(range(1, ITERS + 1))
    for iteration, values in seen.items():
        assert all(v == expected[iteration] for v in values), (iteration, values, expected[iteration])
    assert killed_inside >= 1  # at least one kill did land inside a save
    assert not list(save.glob("iter_*.tmp")) and (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
