"""Ctrl-C (SIGINT) in the entry points (pretrain_gpt.py, tools/): one line and exit status 130
(128 + SIGINT, as a shell reports it), never a KeyboardInterrupt traceback.

- `during_startup(prog)`: the first thing a script does. Until `run_main` takes over, SIGINT
  exits at once with one line: the imports (torch, megatron-core) take seconds, and nothing has
  been written yet.
- `run_main(prog, main)`: SIGINT raises KeyboardInterrupt again, so the code's own clean-up runs
  (a checkpoint being written removes its .tmp, a preprocess its temporaries); main's return
  value, or one line and 130.
- `ExitSignalHandler`: --exit-signal-handler, SIGTERM or SIGINT saves and stops after the step.
Imports nothing heavy: it runs before torch is imported.
"""

import os
import signal
import sys

INTERRUPTED = 130


def is_rank0() -> bool:
    """Rank 0 by the launcher's RANK: answers before torch.distributed is up (one line per run)."""
    return os.environ.get("RANK", "0") == "0"


def during_startup(prog: str) -> None:
    def _exit(signum, frame):
        if is_rank0():
            print(f"{prog}: interrupted (Ctrl-C) during start-up; nothing was written", file=sys.stderr, flush=True)
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGINT, _exit)


def run_main(prog: str, main, *args) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(*args)
    except KeyboardInterrupt:
        if is_rank0():
            print(f"{prog}: interrupted (Ctrl-C); stopped", file=sys.stderr, flush=True)
        return INTERRUPTED


class ExitSignalHandler:
    """--exit-signal-handler: records SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) in
    `pending`; the loop turns it into save-and-exit on every rank, after the current step (or
    evaluation). A second Ctrl-C while one is pending interrupts at once, as without the flag."""

    def __init__(self, sigs=(signal.SIGTERM, signal.SIGINT)):
        self.pending = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in sigs}

    def _handle(self, signum, frame):
        if self.pending and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.pending = True

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
