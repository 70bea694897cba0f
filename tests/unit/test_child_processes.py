"""A trainer's forked children (checkpoint writers, loader workers) die when it is SIGKILLed."""

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import multiprocessing, os, sys, time
from megatron_patch.training.child_processes import die_with_parent
if {install}:
    die_with_parent()
def sleeper(path):
    open(path, "w").write(str(os.getpid()))
    time.sleep(60)
if __name__ == "__main__":
    child = multiprocessing.get_context("fork").Process(target=sleeper, args=({pidfile!r},))
    child.start()
    time.sleep(60)
"""


def child_survives_parent_kill(tmp_path, install: bool) -> bool:
    pidfile = tmp_path / f"child{install}.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(install=install, pidfile=str(pidfile))])
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    time.sleep(0.5)
    if not running(child):
        return False
    os.kill(child, signal.SIGKILL)
    return True


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait a while to be reaped by init)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state and "dead" not in state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_forked_children_die_with_a_killed_parent(tmp_path):
    assert child_survives_parent_kill(tmp_path, install=False)  # what happens without it
    assert not child_survives_parent_kill(tmp_path, install=True)
