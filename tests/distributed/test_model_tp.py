"""Every option gives the same logits / loss / gate gradients at TP=2 as at TP=1 (gloo, 2 procs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tensor_parallel_equals_serial_for_every_option():
    result = torchrun(Path(__file__).with_name("tp_model_worker.py"))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("OK  ") == 15  # 12 option sets and the z-loss with and without WeSaR
