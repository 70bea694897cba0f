"""tests/gpu/run.sh on a machine without CUDA: every GPU part skipped and said so, exit 0; and the
log parsing the GPU parts rely on, against a real trainer log."""

import json
import subprocess
import sys

import pytest
import torch

from tests.gpu import check
from tests.train_helpers import ROOT, pretrain_cmd, subprocess_env, tiny_args


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")
def test_cpu_machine_skips_every_gpu_part_and_says_so(tmp_path):
    proc = subprocess.run(["bash", "tests/gpu/run.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(subprocess_env(), PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cuda"] is False and set(summary["parts"]) == set(check.PARTS)
    assert all("no CUDA GPU" in part["skipped"] for part in summary["parts"].values())
    assert proc.stdout.count("skipped: no CUDA GPU") == len(check.PARTS)
    assert (tmp_path / "summary.txt").read_text().splitlines()[0] == "GPU check: no CUDA GPU"


def test_script_refuses_an_interpreter_without_megatron_core(tmp_path):
    proc = subprocess.run(["bash", "tests/gpu/run.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(subprocess_env(), PYTHON="/bin/false"))
    assert proc.returncode == 1 and "lacks megatron-core" in proc.stderr


def test_figures_are_read_from_the_trainers_log_line():
    proc = subprocess.run(pretrain_cmd(tiny_args("--train-iters", 4, "--fp16", "--peak-tflops", 1.0, mock=True)),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = check.last_log_line(proc.stdout)
    assert set(figures) >= {"tokens_per_s", "tflops", "mfu_percent", "ms_per_iter", "loss_scale", "skipped",
                            "memory_mib"}
    assert figures["tokens_per_s"] > 0 and figures["loss_scale"] < 2.0 ** 32
    assert figures["mfu_percent"] == pytest.approx(100 * figures["tflops"], rel=1e-2, abs=1e-2)


def test_summary_names_failures_and_figures():
    lines = check.summary_lines({"device": "NVIDIA H200", "parts": {
        "gpu_tests": {"ok": True, "summary": "12 passed"}, "throughput": {"ok": True, "tokens_per_s": 12345.6},
        "fp16_scaler": {"ok": False, "error": "boom"}, "te_export": {"ok": True, "skipped": "no TE"},
        "step_time": {"ok": True, "ratios": {"wesar_te / vanilla_te": 1.02}}}})
    assert lines[0] == "GPU check: NVIDIA H200"
    assert "throughput   ok   tokens_per_s=1.235e+04" in lines[2]
    assert "FAIL error=boom" in lines[3] and "skipped: no TE" in lines[4]
