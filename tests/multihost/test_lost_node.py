"""A node that vanishes mid-run (its link goes down: no reset, no exit code, just silence) ends
the run on the other node with one line naming the rank and host that went away, once
--distributed-timeout-minutes has passed; not a bare "Timed out waiting 60000ms for recv"."""

import re

import pytest

from tests.multihost.test_storage import error_lines
from tests.multihost.test_torchrun import TINY, start_plain, wait_for_iteration


@pytest.mark.slow
def test_vanished_node_is_named_after_the_distributed_timeout(two_hosts, tmp_path):
    flags = TINY + ["--train-iters", "100000", "--distributed-timeout-minutes", "1"]
    procs = start_plain(two_hosts, flags, tmp_path, "run")
    wait_for_iteration(procs[0], tmp_path / "run-node1.log", 2)
    two_hosts.link(1, up=False)  # node2 is gone for node1, and node1 for node2
    codes = [p.wait(timeout=300) for p in procs]
    logs = [(tmp_path / f"run-node{n + 1}.log").read_text(errors="replace") for n in range(2)]
    assert codes[0] != 0 and codes[1] != 0, logs
    [line] = error_lines(logs[0])
    assert re.fullmatch(r"pretrain_gpt\.py: error: lost rank 1 \(node2\): no heartbeat for \d+ s, so that node "
                        r"\(or its process\) went away; a collective failed \(\w+\) after "
                        r"--distributed-timeout-minutes 1", line), line
    [line] = error_lines(logs[1])  # node2 cannot reach node1, where the rendezvous store is
    assert line.startswith("pretrain_gpt.py: error: lost rank 0 (node1): the rendezvous store it holds at "
                           "node1:29500 cannot be reached from rank 1 (node2)"), line
    for log in logs:
        assert "Traceback" not in log, log[-3000:]
