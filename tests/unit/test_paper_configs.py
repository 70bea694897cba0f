"""examples/paper: every configuration parses and fits its stated cluster; the script's modes work."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patch.training import dry_run

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "examples" / "paper"
_spec = importlib.util.spec_from_file_location("plan_table", PAPER / "plan_table.py")
plan_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan_table)

NOMINAL = {"350m": 350e6, "1.7b": 1.7e9, "13b": 13e9}
SOURCE_TAGS = ("[SNM]", "[WeSaR]", "[MLM]", "[choice]", "[unverified]", "required")


def paper_runs():
    """(size, method, lr) of every row of runs.tsv plus every size x method at its default lr."""
    runs = {(s, m, None) for s in plan_table.SIZES for m in plan_table.METHODS}
    for line in (PAPER / "runs.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            size, method, lr = line.split("\t")[:3]
            runs.add((size, method, lr))
    return sorted(runs, key=str)


@pytest.mark.parametrize("size,method,lr", paper_runs())
def test_every_paper_run_validates_and_fits_its_cluster(size, method, lr):
    args, p = plan_table.plan_run(size, method, lr)
    assert p["fits"] and args.global_batch_size == 528 and args.seq_length == 2048
    assert abs(p["parameters"] / NOMINAL[size] - 1) < 0.05, p["parameters"]
    if lr is not None:
        assert args.lr == float(lr)


@pytest.mark.parametrize("size", plan_table.SIZES)
def test_wesar_plans_vanillas_memory_and_layout(size):
    """The gates sit on the linears' outputs, so WeSaR runs on the same (TE) layers as Vanilla:
    same layout, memory within 5%, parameters differing by the gates only."""
    (va, vp), (wa, wp) = plan_table.plan_run(size, "vanilla"), plan_table.plan_run(size, "wesar")
    assert (wa.tensor_model_parallel_size, wa.pipeline_model_parallel_size, wa.micro_batch_size) == \
        (va.tensor_model_parallel_size, va.pipeline_model_parallel_size, va.micro_batch_size)
    assert abs(wp["memory"].total / vp["memory"].total - 1) < 0.05
    assert wp["parameters"] - vp["parameters"] == 6 * va.num_layers  # Q, K, V, O, fc1, fc2 (tied head)


def test_every_value_states_its_source():
    files = [PAPER / "common.args", *(PAPER / "sizes").glob("*.args"), *(PAPER / "methods").glob("*.args")]
    assert len(files) == 1 + len(plan_table.SIZES) + len(plan_table.METHODS)
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip().startswith("--"):
                assert any(tag in line for tag in SOURCE_TAGS), f"{path.name}: {line}"


def test_methods_differ_only_by_their_own_flags():
    base = plan_table.paper_argv("350m", "vanilla")
    for method, flag in (("embed_detach", "--embed-detach-alpha"), ("embed_ln", "--embed-layernorm"),
                         ("scaled_embed", "--scaled-embed"), ("wesar", "--wesar"),
                         ("xavier_init", "xavier"), ("sigma1_embed", "--embedding-init-method-std")):
        argv = plan_table.paper_argv("350m", method)
        assert flag in argv and flag not in base
        assert [w for w in base if w not in argv] in ([], ["transformer_engine"], ["5e-4"])


def script(*argv, **env):
    env = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(PAPER / "pretrain.sh"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_plan_for_the_cluster_in_the_environment():
    r = script("--size", "350m", "--method", "scaled_embed", "--lr", "1e-3", "--dry-run",
               NNODES="2", GPUS_PER_NODE="8")
    assert r.returncode == 0, r.stderr
    assert "world 16 = TP 1 x PP 1 x DP 16" in r.stdout
    args, p = plan_table.plan_run("350m", "scaled_embed", "1e-3")
    assert f"parameters: {p['parameters']}\n" in r.stdout


def test_print_flags_gives_trainer_flags_with_layout_and_checkpoints(tmp_path):
    r = script("--size", "13b", "--method", "vanilla", "--print-flags", "--run-dir", str(tmp_path),
               "--", "--train-iters", "3000", NNODES="4", GPUS_PER_NODE="8", DATA_PATH="mock")
    assert r.returncode == 0, r.stderr
    flags = r.stdout.splitlines()  # one flag or value per line; the report went to stderr
    assert "parameters: " in r.stderr and not any(f.startswith("parameters") for f in flags)
    assert flags[-2:] == ["--train-iters", "3000"]  # flags after -- come last, so they win
    for pair in (["--tensor-model-parallel-size", "2"], ["--save", f"{tmp_path}/checkpoints"],
                 ["--load", f"{tmp_path}/checkpoints"]):
        assert any(flags[i:i + 2] == pair for i in range(len(flags))), pair
    assert "--exit-signal-handler" in flags and "--fp16" in flags
    args = dry_run.parse_for_plan(flags, 32)  # what pretrain_gpt.py will get validates for 32 GPUs
    assert args.train_iters == 3000 and args.data_parallel_size == 16


def test_a_real_run_needs_data():
    r = script("--size", "350m", "--method", "vanilla", "--print-flags", GPUS_PER_NODE="8", DATA_PATH="")
    assert r.returncode == 2 and "set DATA_PATH" in r.stderr


def test_bad_options_fail_before_python():
    r = script("--size", "7b", "--method", "vanilla", "--dry-run")
    assert r.returncode == 2 and "--size must be one of: 1.7b 13b 350m" in r.stderr


def test_paper_config_plans_with_the_stability_monitor(capsys):
    """The paper configs use the distributed optimizer and fp16: the monitor runs with both."""
    argv = plan_table.paper_argv("350m", "vanilla") + [
        "--monitor-interval", "100", "--spike-policy", "rollback", "--save", "/runs/350m", "--dry-run",
        "--world-size", "8", "--choose-layout"]
    assert dry_run.main(argv) == 0, capsys.readouterr().err
