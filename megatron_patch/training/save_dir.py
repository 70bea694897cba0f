"""The --save directory before training starts: one trainer at a time, writable, no run lost.

- Lock: rank 0 creates <save>/.megatron_patch.lock (O_EXCL) holding "host pid [slurm job id]" and
  removes it when the run ends. A second trainer on the same directory refuses in one line naming
  the holder. A lock whose process is gone is taken over with a notice: same host and pid not
  alive, or the same Slurm job (a requeued job keeps its SLURM_JOB_ID, and Slurm starts it again
  only once the previous run has ended, on whatever node). Any other lock from another host cannot
  be checked from here and is refused (remove the file if that run is gone).
- Writable: creating the lock is the check, at start-up, before any heavy work.
- No run lost: a fresh run (not resuming from this directory) refuses a --save that already holds
  a run unless --overwrite-checkpoints is given; otherwise it would move the tracker back and
  overwrite that run's checkpoints.
- Clean-up: iter_*.tmp directories left by a crash inside a save are removed once the lock is held.
"""

import errno
import glob
import os
import shutil
import socket

from . import checkpointing
from .child_processes import process_alive
from .errors import SetupError

LOCK = ".megatron_patch.lock"


def _read_lock(path):
    """(host, pid, slurm job id or None), or None if unreadable."""
    try:
        with open(path) as f:
            fields = f.read().split()
        return fields[0], int(fields[1]), (fields[2] if len(fields) > 2 else None)
    except (OSError, ValueError, IndexError):
        return None  # being written, or garbage: treated as held by an unknown process


def _slurm_job() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


class SaveDirLock:
    """with SaveDirLock(save_dir) as lock: ... (rank 0 only); lock.notice says if one was taken over."""

    def __init__(self, save_dir: str):
        self.path, self.notice, self._held = os.path.join(save_dir, LOCK), None, False

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as exc:
                raise SetupError(f"--save {os.path.dirname(self.path)} is not writable ({os.strerror(exc.errno)}); "
                                 "choose a directory this job can write to") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()} {_slurm_job()}".strip() + "\n")
            self._held = True
            return self
        raise SetupError(f"cannot take the lock {self.path}")

    def _take_over_if_stale(self):
        holder = _read_lock(self.path)
        here = holder is not None and holder[0] == socket.gethostname()
        alive_here = here and process_alive(holder[1])
        requeued = holder is not None and holder[2] is not None and holder[2] == _slurm_job() and not alive_here
        dead_here = here and not alive_here
        if not (requeued or dead_here):
            who = f"{holder[0]} pid {holder[1]}" if holder else "another process"
            raise SetupError(f"--save {os.path.dirname(self.path)} is in use by another trainer ({who}, lock "
                             f"{self.path}); use another --save, or remove the lock if that run is gone")
        why = f"an earlier run of Slurm job {holder[2]}" if requeued else "a trainer that is gone"
        self.notice = f"took over the lock of {why} ({holder[0]} pid {holder[1]})"
        os.remove(self.path)

    def __exit__(self, *exc):
        if self._held:
            try:
                os.remove(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            self._held = False


def prepare(args) -> "SaveDirLock | None":
    """Rank 0's checks of --save before the run (call on rank 0 only); the held lock, or None
    without --save. Raises SetupError in one line for each refusal."""
    if not args.save:
        return None
    save = args.save
    if os.path.exists(save) and not os.path.isdir(save):
        raise SetupError(f"--save {save} is a file; give a directory")
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"--save {save} cannot be created ({os.strerror(exc.errno)}); choose a directory "
                         "this job can write to") from None
    lock = SaveDirLock(save).__enter__()
    try:
        _refuse_overwriting_a_run(args)
        for stale in glob.glob(os.path.join(save, "iter_*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        lock.__exit__()
        raise
    return lock


def _refuse_overwriting_a_run(args) -> None:
    tracker = os.path.join(args.save, checkpointing.TRACKER)
    if not os.path.isfile(tracker) or getattr(args, "overwrite_checkpoints", False):
        return
    resuming = args.load and os.path.realpath(args.load) == os.path.realpath(args.save)
    if resuming:
        return
    with open(tracker) as f:
        latest = f.read().strip()
    raise SetupError(f"--save {args.save} already holds a run (latest checkpoint: iteration {latest}); resume "
                     f"it with --load {args.save}, choose another --save, or pass --overwrite-checkpoints")


def output_dir_problem(flag: str, path: str):
    """One line if `path` cannot become a directory we write to, else None. Creates nothing (a
    refused run leaves no trace): the path, or its nearest existing ancestor, must be a writable
    directory. As root every directory is writable, so what is caught there is a file in the way."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe}"
        return f"{flag} {path} {where}; give a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{flag} {path}: {probe} is not writable; choose a directory you can write to"
    return None
