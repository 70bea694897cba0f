"""Crash and preemption: SIGKILL after a checkpoint then --load continues bit-exactly; SIGTERM
with --exit-signal-handler (Slurm preemption) saves and stops every rank cleanly.

Both runs are started side by side (start-up dominates their cost). The killed run and the
in-process runs use one thread each, so the floating-point work is identical and the resumed
losses must equal the uninterrupted ones exactly.
"""

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.train_helpers import (ROOT, logged_losses, losses, make_corpus, pretrain_cmd, run_inprocess,
                                 subprocess_env, tiny_args, torchrun_cmd)

LONG = 100000  # --train-iters of the runs that are interrupted (the LR schedule depends on it)


def wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preempt")
    corpus = make_corpus(tmp / "data" / "tiny_text_document")
    argv = tiny_args("--train-iters", LONG, "--lr-decay-iters", 40, data=corpus)
    logs = {name: open(tmp / f"{name}.log", "w") for name in ("killed", "terminated")}
    killed = subprocess.Popen(pretrain_cmd(argv + ["--save", tmp / "k", "--save-interval", 4]), cwd=ROOT,
                              env=subprocess_env(), stdout=logs["killed"], stderr=subprocess.STDOUT)
    terminated = subprocess.Popen(
        torchrun_cmd(ROOT / "pretrain_gpt.py", argv + ["--save", tmp / "t", "--exit-signal-handler"]),
        cwd=ROOT, env=subprocess_env(), stdout=logs["terminated"], stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_for(lambda: (tmp / "k" / "latest_checkpointed_iteration.txt").exists(), 240, "a checkpoint")
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        wait_for(lambda: "iteration        3/" in (tmp / "terminated.log").read_text(), 240, "iteration 3")
        os.killpg(terminated.pid, signal.SIGTERM)  # like Slurm: every process of the job step
        terminated.wait(120)
    finally:
        for p in (killed, terminated):
            if p.poll() is None:
                p.kill()
        for f in logs.values():
            f.close()
    return tmp, argv


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_then_load_continues_bit_exactly(interrupted, one_thread):
    tmp, argv = interrupted
    saved = int((tmp / "k" / "latest_checkpointed_iteration.txt").read_text())
    assert saved % 4 == 0 and (tmp / "k" / f"iter_{saved:07d}").is_dir()
    stop = saved + 4
    resumed = run_inprocess(argv + ["--load", tmp / "k", "--exit-interval", stop])
    reference = run_inprocess(argv + ["--exit-interval", stop])
    assert [h["iteration"] for h in resumed.history] == list(range(saved + 1, stop + 1))
    assert losses(resumed) == losses(reference)[saved:]
    before_kill = logged_losses((tmp / "killed.log").read_text())
    for it in range(1, saved + 1):  # the killed process computed the same curve up to its checkpoint
        assert f"{before_kill[it]:.6E}" == f"{losses(reference)[it - 1]:.6E}"


@pytest.mark.slow
def test_sigterm_saves_and_exits_on_every_rank(interrupted):
    tmp, argv = interrupted
    log = (tmp / "terminated.log").read_text()
    assert "exiting after iteration" in log and "(signal)" in log, log[-3000:]
    stopped = int(log.split("exiting after iteration ")[1].split()[0])
    assert (tmp / "t" / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    assert max(logged_losses(log)) == stopped
    assert "Traceback" not in log.split("Received 15 death signal")[0]  # workers ended cleanly
    resumed = run_inprocess(argv + ["--load", tmp / "t", "--skip-train"])
    assert resumed.state.iteration == stopped
