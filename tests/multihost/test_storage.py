"""A --save (or --load) the nodes do not share never passes silently. Each node gets its own
directory at the same path (a bind mount in node2's private mount namespace), the cluster
mistake that otherwise publishes a checkpoint holding one node's shards and exits 0."""

import re
import subprocess
import sys

import pytest

from tests.multihost.test_torchrun import (ROOT, TINY, env, finish, start_on_two_hosts, start_plain,
                                           wait_for_iteration)

ERROR = "pretrain_gpt.py: error: "


def error_lines(log: str) -> list:
    return [line for line in log.splitlines() if line.startswith(ERROR)]


@pytest.mark.slow
def test_per_node_save_or_load_is_refused_at_start_up_in_one_line(two_hosts, tmp_path):
    """--save: rank 0's nonce is not there on node2. --load (read-only, so no nonce): node2 sees no
    checkpoint where node1 sees one. The two runs go side by side (own rendezvous ports)."""
    save, load, elsewhere = tmp_path / "ckpt", tmp_path / "pretrained", tmp_path / "ckpt2"
    private = {name: tmp_path / f"node2-disk-{name}" for name in ("save", "load")}
    for d in (save, *private.values()):
        d.mkdir()
    made = subprocess.run([sys.executable, "pretrain_gpt.py", *TINY, "--train-iters", "2", "--save", str(load)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]  # a checkpoint for --load, made on this machine
    flags = {"save": TINY + ["--train-iters", "3", "--save", str(save), "--load", str(save)],
             "load": TINY + ["--train-iters", "4", "--save", str(elsewhere), "--load", str(load)]}
    runs = {name: start_on_two_hosts(two_hosts, flags[name], tmp_path, name, port=29400 + i,
                                     binds=((), ((private[name], target),)))
            for i, (name, target) in enumerate((("save", save), ("load", load)))}
    results = {name: finish(procs, tmp_path, name) for name, procs in runs.items()}

    codes, logs = results["save"]
    assert codes[0] != 0 and codes[1] != 0
    assert error_lines(logs[1]) == []  # only rank 0 prints it
    [line] = error_lines(logs[0])
    assert re.fullmatch(rf"{ERROR}--save {save} on node2 \(rank 1\) is not the directory rank 0 \(node1\) "
                        r"writes to .*; put it on storage every node mounts at that path .*", line), line
    assert not re.search(r"iteration\s+1/", logs[0] + logs[1])  # refused before any training
    assert sorted(p.name for p in save.iterdir()) == []  # lock and nonce removed, nothing written
    assert sorted(p.name for p in private["save"].iterdir()) == []

    codes, logs = results["load"]
    assert codes[0] != 0 and codes[1] != 0
    [line] = error_lines(logs[0])
    assert line.startswith(f"{ERROR}--load {load} on node2 (rank 1) does not hold what rank 0 (node1) sees"), line
    assert not re.search(r"iteration\s+1/", logs[0] + logs[1])


@pytest.mark.slow
def test_checkpoint_is_not_published_when_a_rank_wrote_where_rank_0_cannot_see(two_hosts, tmp_path):
    """--save stops being shared mid-run (node2 remounts it after the start-up proof passed); the
    SIGTERM checkpoint that follows is refused in one line and never published."""
    save, private = tmp_path / "ckpt", tmp_path / "node2-disk"
    private.mkdir()
    flags = TINY + ["--train-iters", "100000", "--save", str(save), "--exit-signal-handler"]
    procs = start_plain(two_hosts, flags, tmp_path, "run")
    wait_for_iteration(procs[0], tmp_path / "run-node1.log", 2)
    two_hosts.mount_private(procs[1], private, save)
    two_hosts.kill(procs[0], "TERM")  # save and exit, on every rank
    codes = [p.wait(timeout=120) for p in procs]
    text = [(tmp_path / f"run-node{n + 1}.log").read_text() for n in range(2)]
    assert codes[0] != 0 and codes[1] != 0, text
    [line] = error_lines(text[0])
    assert re.fullmatch(rf"{ERROR}checkpoint of iteration \d+ not published: \d+ file\(s\) written by node2 "
                        rf"\(rank 1\) are missing from {save}/iter_\d+\.tmp as rank 0 \(node1\) sees it; "
                        r"--save is not shared storage: put it on storage every node mounts .*", line), line
    assert not (save / "latest_checkpointed_iteration.txt").exists()
    assert not [p for p in save.iterdir() if re.fullmatch(r"iter_\d+", p.name)]  # nothing published
