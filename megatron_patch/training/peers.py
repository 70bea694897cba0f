"""When a node goes away mid-run, say which: the rank and host, not a bare collective timeout.

A killed worker is reported by the launcher within seconds. A node that vanishes (power, link,
kernel panic) is not: the other ranks wait in their next collective until the process group's
timeout (--distributed-timeout-minutes, Megatron-LM's default 10) and then fail with Gloo's
"Timed out waiting 60000ms for recv operation" or NCCL's watchdog message, naming no peer.

Each rank runs a heartbeat: a daemon thread that increments its own counter in the rendezvous
store (MASTER_ADDR:MASTER_PORT, the TCPStore every rank already talks to) every HEARTBEAT_SECONDS.
When a collective fails with a timeout or a dropped connection, `explain_lost` watches the
counters for a few beats: the ranks whose counters stand still are the ones that went away. A rank
that cannot reach the store at all has lost rank 0's host, which holds it. Costs: one small store
write per rank every few seconds; nothing when no collective fails.
"""

import datetime
import os
import socket
import threading
import time

HEARTBEAT_SECONDS = 5.0
_PREFIX = "megatron_patch/heartbeat/"
_COMMUNICATION_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                          "connection refused", "no route to host")
_state = {}


class PeerLost(Exception):
    """A collective failed because these ranks went away (the message names them)."""


def _store(timeout_s):
    """A client of the rendezvous store, with its own short timeout. Its port is probed first
    with a plain socket: a TCPStore client that cannot connect logs a C++ backtrace per retry."""
    import torch

    with socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=timeout_s):
        pass
    return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                      is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                                      wait_for_workers=False)


def start_heartbeat() -> None:
    """Every rank, once torch.distributed is up (one collective: the hostname of each rank)."""
    import torch

    if torch.distributed.get_world_size() == 1 or "MASTER_ADDR" not in os.environ or _state.get("thread"):
        return
    rank = torch.distributed.get_rank()
    hosts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    _state.update(rank=rank, hosts=list(hosts), stop=threading.Event())

    def beat():
        store = None
        while not _state["stop"].is_set():
            try:
                store = store or _store(2 * HEARTBEAT_SECONDS)
                store.add(f"{_PREFIX}{rank}", 1)
            except Exception:  # noqa: BLE001 - the store is unreachable now; try again next beat
                store = None
            _state["stop"].wait(HEARTBEAT_SECONDS)

    _state["thread"] = threading.Thread(target=beat, name="megatron_patch-heartbeat", daemon=True)
    _state["thread"].start()


def stop_heartbeat() -> None:
    if _state.get("thread"):
        _state["stop"].set()
        _state["thread"].join(timeout=2 * HEARTBEAT_SECONDS)
    _state.clear()


def is_communication_failure(exc) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(marker in text for marker in _COMMUNICATION_FAILURE)


def _counters(store, world_size):
    return [int(store.get(f"{_PREFIX}{r}")) if store.check([f"{_PREFIX}{r}"]) else 0 for r in range(world_size)]


def explain_lost(exc, timeout_minutes) -> "str | None":
    """One line naming the ranks (and hosts) that went away, if `exc` is a communication failure
    and the heartbeats show who; None otherwise (the caller then re-raises `exc` unchanged).
    Call while this rank's heartbeat still runs: the other survivors watch it."""
    if "hosts" not in _state or not is_communication_failure(exc):
        return None
    rank, hosts = _state["rank"], _state["hosts"]
    waited = f"a collective failed ({type(exc).__name__}) after --distributed-timeout-minutes {timeout_minutes}"
    try:
        store = _store(2 * HEARTBEAT_SECONDS)
        before = _counters(store, len(hosts))
        time.sleep(3 * HEARTBEAT_SECONDS)
        after = _counters(store, len(hosts))
    except Exception:  # noqa: BLE001 - the store itself is gone: rank 0's host holds it
        if rank == 0:
            return None
        return (f"lost rank 0 ({hosts[0]}): the rendezvous store it holds at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} cannot be reached from rank {rank} ({hosts[rank]}), so that node or "
                f"the network to it went away; {waited}")
    lost = [r for r in range(len(hosts)) if r != rank and after[r] == before[r]]
    if not lost:
        return None
    names = ", ".join(f"rank {r} ({hosts[r]})" for r in lost[:8])
    names += f" and {len(lost) - 8} more" if len(lost) > 8 else ""
    return (f"lost {names}: no heartbeat for {3 * HEARTBEAT_SECONDS:.0f} s, so that node (or its process) "
            f"went away; {waited}")
