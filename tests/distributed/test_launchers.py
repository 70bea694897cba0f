"""The launch scripts run a tiny CPU job: torchrun (one node; two "nodes" via rendezvous) and a
real one-node Slurm (sbatch, 2 tasks, SIGTERM checkpoint, requeue, resume); shellcheck-clean."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_patch.training import dry_run
from tests.conftest import free_port
from tests.train_helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["examples/torchrun_pretrain.sh", "examples/paper/pretrain.sh", "examples/slurm/pretrain.sbatch",
           "tests/slurm/start.sh", "tests/slurm/install.sh", "docker/build_check.sh", "docker/install.sh",
           "docker/test_image.sh", "docker/base_image.sh", ".ci/lanes/40-docker.sh", ".ci/prepare/docker-base.sh",
           "examples/quickstart.sh", "tools/setup_env.sh", "tests/run.sh", ".ci/run", "tests/gpu/run.sh"]
TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--lr 1e-3 --mock-data --vocab-size 100 --log-interval 1 --eval-iters 0").split()


def env(**extra):
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)


def rank0_parameters(log: str) -> int:
    return int(re.search(r"([\d,]+) parameters on rank 0", log).group(1).replace(",", ""))


def planned_rank0_parameters(flags, world_size, last_stage):
    """Parameters the dry run expects on the GPU of global rank 0 (first pipeline stage, TP rank 0)."""
    args = dry_run.parse_for_plan(flags, world_size)
    padded = dry_run.plan(args)["padded_vocab"]
    return dry_run.stage_parameters(args, args.transformer_config, padded, True, last_stage).total


def assert_checkpoint(directory: Path, iteration: int):
    assert (directory / "latest_checkpointed_iteration.txt").read_text().strip() == str(iteration)
    assert (directory / f"iter_{iteration:07d}").is_dir()


@pytest.mark.slow
def test_torchrun_single_node_two_processes(tmp_path):
    flags = TINY + ["--train-iters", "3", "--tensor-model-parallel-size", "2", "--save", str(tmp_path)]
    r = subprocess.run(["bash", "examples/torchrun_pretrain.sh", "--nproc-per-node", "2", "--", *flags],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "iteration        3/       3" in log and "TP=2 PP=1 DP=1" in log
    assert_checkpoint(tmp_path, 3)
    assert rank0_parameters(log) == planned_rank0_parameters(flags, 2, last_stage=True)  # TP shard


@pytest.mark.slow
def test_torchrun_two_nodes_by_rendezvous(tmp_path):
    flags = TINY + ["--train-iters", "3", "--save", str(tmp_path)]
    node_env = env(NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   RDZV_ID=f"test-{os.getpid()}")
    cmd = ["bash", "examples/torchrun_pretrain.sh", "--", *flags]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    log = "".join(logs)
    assert "DP=2" in log and "iteration        3/       3" in log
    assert_checkpoint(tmp_path, 3)


# ---------------------------------------------------------------- Slurm
def _why_no_slurm():
    if not sys.platform.startswith("linux"):
        return "Slurm test needs Linux"
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    if missing:
        return f"{', '.join(missing)} not installed (run: bash tests/slurm/install.sh)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


@pytest.fixture
def slurm(tmp_path):
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    state = tmp_path / "slurm"
    start = subprocess.run(["bash", "tests/slurm/start.sh", "--state-dir", str(state)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    if start.returncode != 0:
        pytest.skip(f"Slurm could not be started here: {start.stderr.strip()[-500:]}")
    try:
        yield env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run(["bash", "tests/slurm/start.sh", "--state-dir", str(state), "--stop"], cwd=ROOT, timeout=60)


def release_requeued(job, slurm_env, timeout=180.0):
    """Start a requeued job now: Slurm makes it wait ~2 minutes (BeginTime) once it is pending."""
    deadline, pending, seen = time.time() + timeout, False, []
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=slurm_env, capture_output=True,
                               text=True, timeout=30).stdout.strip()
        if not seen or seen[-1] != state:
            seen.append(state)
        if state.startswith("PENDING"):  # (while the old run is still completing, an update is overwritten)
            pending = True
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env, timeout=30)
        elif state.startswith("RUNNING") and pending:
            return
        time.sleep(1)
    ctld_log = Path(slurm_env["SLURM_CONF"]).with_name("slurmctld.log").read_text()[-2000:]
    raise AssertionError(f"requeued job {job} did not start again; states: {seen}\n{ctld_log}")


@pytest.mark.slow
def test_slurm_sbatch_trains_checkpoints_on_signal_requeues_and_resumes(slurm, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    flags = TINY + ["--train-iters", "100000", "--pipeline-model-parallel-size", "2"]
    submit = subprocess.run(
        ["sbatch", "--parsable", "--job-name", "tiny", "--ntasks-per-node", "2", "--output", str(log),
         "examples/slurm/pretrain.sbatch", "--run-dir", str(run_dir), "--", *flags],
        cwd=ROOT, env=dict(slurm, MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=30)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]

    try:
        wait_for(r"iteration\s+3/", log, what="3 training iterations")
        # What Slurm does near the time limit (--signal=B:USR1@600): the script checkpoints and requeues.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True, timeout=30)
        saved = int(wait_for(r"exiting after iteration (\d+) \(signal\)", log, what="SIGTERM checkpoint").group(1))
        wait_for(r"requeued job", log, what="requeue")
        assert_checkpoint(run_dir / "checkpoints", saved)
        release_requeued(job, slurm)
        wait_for(rf"loaded checkpoint .*\(iteration {saved},", log, what="resume from the checkpoint")
        wait_for(rf"iteration\s+{saved + 1}/", log, what="training after the resume")
    finally:
        subprocess.run(["scancel", job], env=slurm, timeout=30)
    final = int(wait_for(r"restart 1[\s\S]*exiting after iteration (\d+) \(signal\)", log,
                         what="checkpoint on scancel").group(1))
    assert final > saved
    text = log.read_text()
    assert "(restart 0)" in text and "(restart 1)" in text and "TP=1 PP=2 DP=1" in text
    assert rank0_parameters(text) == planned_rank0_parameters(flags, 2, last_stage=False)  # first PP stage


# ---------------------------------------------------------------- shellcheck
def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or bash tests/slurm/install.sh)")
    scripts = [s for s in SCRIPTS if (ROOT / s).exists()]
    r = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


# ---------------------------------------------------------------- Docker (static: no daemon here)
def test_dockerfile_pins_what_setup_py_pins_and_uses_existing_scripts():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "nvcr.io/nvidia/pytorch:" in dockerfile and "python:3.11" in dockerfile
    # The CPU stage first: the legacy builder builds every stage up to --target.
    assert dockerfile.index(" AS cpu\n") < dockerfile.index(" AS gpu\n")
    for script in re.findall(r"bash (docker/\S+\.sh)", dockerfile):
        assert (ROOT / script).is_file(), script
    # The GPU image installs the newest megatron-core setup.py admits: its range starts inside setup.py's.
    from packaging.specifiers import SpecifierSet

    setup_range = SpecifierSet(re.search(r'"megatron-core([^"]+)"', (ROOT / "setup.py").read_text()).group(1))
    image_range = re.search(r'"megatron-core>=([\d.]+)(,<[\d.]+)?"', (ROOT / "docker" / "install.sh").read_text())
    assert image_range and image_range.group(1) in setup_range, image_range
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
