"""Slurm across two hosts: examples/slurm/pretrain.sbatch with --nodes 2 and one task per node,
with the srun launcher (DP over the nodes) and the torchrun launcher (TP over the nodes), gives
the losses of the same run as two processes on one host; scancel mid-run leaves a complete
checkpoint (both nodes' shards) from which a new job resumes."""

import time

import pytest

from tests.multihost.conftest import required
from tests.multihost.hosts import IFNAME
from tests.multihost.slurm import TwoNodeSlurm, why_no_slurm
from tests.multihost.test_torchrun import ROOT, TINY, env, losses, one_host
from tests.train_helpers import wait_for

ITERS = 6


def wait_done(slurm, job, timeout=300.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = slurm.job_state(job)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {state} after {timeout} s")


def sbatch(slurm, log, *args):
    r = slurm.cmd("sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--output", str(log),
                  "examples/slurm/pretrain.sbatch", *map(str, args), cwd=ROOT, env=env())
    return r.stdout.strip().split(";")[0]


@pytest.fixture
def slurm(two_hosts, tmp_path):
    reason = why_no_slurm()
    if reason:
        required(reason)
    cluster = TwoNodeSlurm(two_hosts, tmp_path / "slurm")
    cluster.start()
    return cluster


@pytest.mark.slow
def test_sbatch_on_two_nodes_srun_and_torchrun_scancel_and_resume(slurm, tmp_path):
    layouts = {"srun": [], "torchrun": ["--tensor-model-parallel-size", "2"]}
    flags = {name: TINY + ["--train-iters", str(ITERS)] + extra for name, extra in layouts.items()}
    baselines = {name: one_host(flags[name], tmp_path, name) for name in layouts}
    logs = {name: tmp_path / f"{name}.out" for name in [*layouts, "scancel", "resume"]}
    jobs = {name: sbatch(slurm, logs[name], "--launcher", name, "--socket-ifname", IFNAME,
                         "--run-dir", tmp_path / name, "--", *flags[name]) for name in layouts}
    # A long DP run (srun launcher), cancelled once it trains: SIGTERM -> checkpoint -> exit.
    run_dir = tmp_path / "cancelled"
    long_flags = TINY + ["--train-iters", "100000"]
    jobs["scancel"] = sbatch(slurm, logs["scancel"], "--run-dir", run_dir, "--", *long_flags)

    for name in layouts:
        assert wait_done(slurm, jobs[name]) == "COMPLETED", logs[name].read_text()[-3000:]
        assert baselines[name].wait(timeout=300) == 0
        expected = losses((tmp_path / f"{name}-one-host.log").read_text())
        text = logs[name].read_text()
        assert "2 node(s) x 1 process(es)" in text and f"launcher {name}" in text
        assert losses(text) == expected, name
        assert sorted(expected) == list(range(1, ITERS + 1))

    wait_for(r"iteration\s+3/", logs["scancel"], what="3 iterations of the job to cancel")
    start = time.time()
    slurm.cmd("scancel", jobs["scancel"])
    saved = int(wait_for(r"exiting after iteration (\d+) \(signal\)", logs["scancel"],
                         what="the SIGTERM checkpoint").group(1))
    wait_done(slurm, jobs["scancel"])
    stopped_in = time.time() - start
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(saved)
    files = sorted(p.name for p in (ckpt / f"iter_{saved:07d}").iterdir())
    assert ".metadata" in files and any(f.startswith("__0_") for f in files) \
        and any(f.startswith("__1_") for f in files), files  # both nodes' shards
    assert stopped_in < 60, f"scancel took {stopped_in:.0f} s"

    jobs["resume"] = sbatch(slurm, logs["resume"], "--run-dir", run_dir, "--",
                            *long_flags, "--exit-interval", str(saved + 2))
    assert wait_done(slurm, jobs["resume"]) == "COMPLETED", logs["resume"].read_text()[-3000:]
    text = logs["resume"].read_text()
    assert f"(iteration {saved}," in text and "loaded checkpoint" in text
    assert sorted(losses(text)) == [saved + 1, saved + 2]
