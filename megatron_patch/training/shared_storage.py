"""Every node must see the same --save and --load directory; prove it instead of assuming it.

A --save on storage the nodes do not share (a node-local disk, or a path that is a different
directory on each node) is a common cluster mistake, and without these checks it loses the run
silently: each node writes its own shards into its own copy of iter_N.tmp, rank 0 publishes a
checkpoint that holds only its node's shards, the run exits 0, and a later resume hangs for the
distributed timeout with an error that blames a send.

- At start-up (`prove_same_directories`, every rank, before any heavy work): rank 0 writes a
  random nonce into --save; after a collective every rank reads it back. For --load (which may
  be read-only) every rank compares what it sees of the checkpoint to resume (the tracker, and
  names and sizes in that iteration's directory) with what rank 0 sees. Either failing is refused
  in one line naming the hosts that cannot see rank 0's directory.
- At publish (`check_complete`, every rank, after the save): rank 0 reads the torch_dist
  checkpoint's .metadata and stats every file it references; a file missing (or short) means a
  rank wrote where rank 0 cannot see, and the checkpoint is not published (the tracker stays on
  the last good one). This also catches storage that stops being shared mid-run.

Costs: one small file and two object collectives at start-up; at a save, rank 0 reads
.metadata and stats a few files per rank.
"""

import os
import secrets
import socket
import time

import torch

from .checkpoint_names import TRACKER
from .errors import SetupError

NONCE_PREFIX = ".megatron_patch.shared-"
SETTLE_SECONDS = 5.0  # a network filesystem may show a just-written file on other nodes a little later
FIX = "put it on storage every node mounts at that path (NFS, Lustre, GPFS, ...)"


def _distributed() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _gather(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _retry(check, seconds=SETTLE_SECONDS):
    """check() -> bool, retried until true or `seconds` have passed; the last result."""
    deadline = time.monotonic() + seconds
    while True:
        ok = check()
        if ok or time.monotonic() >= deadline:
            return ok
        time.sleep(0.5)


def _who(ranks, hosts) -> str:
    """'node2 (ranks 2, 3), node3 (rank 4)'"""
    by_host = {}
    for rank in ranks:
        by_host.setdefault(hosts[rank], []).append(rank)
    return ", ".join(f"{host} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
                     for host, rs in by_host.items())


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _prove_save(save, rank):
    """Rank 0 writes a nonce file into `save`; the ranks that cannot read it back."""
    nonce = None
    if rank == 0:
        nonce = secrets.token_hex(16)
        with open(os.path.join(save, NONCE_PREFIX + nonce), "w") as f:
            f.write(nonce)
            f.flush()
            os.fsync(f.fileno())
    nonce = _broadcast(nonce)  # also the barrier: rank 0's file is written before anyone reads
    path = os.path.join(save, NONCE_PREFIX + nonce)
    sees = _retry(lambda: _read(path) == nonce)
    seen = _gather(sees)
    if rank == 0:
        os.remove(path)
    return [r for r, ok in enumerate(seen) if not ok]


def _checkpoint_view(load):
    """What this rank sees of the checkpoint --load would resume: the tracker's text and the
    names and sizes of the files in that iteration's directory (None where absent)."""
    tracker = _read(os.path.join(load, TRACKER))
    files = None
    if tracker is not None and tracker.strip().isdigit():
        iter_dir = os.path.join(load, f"iter_{int(tracker.strip()):07d}")
        try:
            files = sorted((e.name, e.stat().st_size) for e in os.scandir(iter_dir) if e.is_file())
        except OSError:
            files = None
    return tracker, files


def _prove_load(load, rank):
    """The ranks whose view of --load's latest checkpoint differs from rank 0's."""
    reference = _broadcast(_checkpoint_view(load) if rank == 0 else None)
    same = _retry(lambda: _checkpoint_view(load) == reference)
    return [r for r, ok in enumerate(_gather(same)) if not ok]


def prove_same_directories(args) -> None:
    """Refuse (SetupError on every rank) unless every rank sees rank 0's --save and --load.
    Call on every rank after torch.distributed is up and rank 0 has created --save."""
    if not _distributed():
        return
    rank, hosts = torch.distributed.get_rank(), _gather(socket.gethostname())
    if args.save:
        lost = _prove_save(args.save, rank)
        if lost:
            raise SetupError(f"--save {args.save} on {_who(lost, hosts)} is not the directory rank 0 "
                             f"({hosts[0]}) writes to (a file rank 0 wrote there is not visible); {FIX}")
    if args.load and not (args.save and os.path.realpath(args.load) == os.path.realpath(args.save)):
        lost = _prove_load(args.load, rank)
        if lost:
            raise SetupError(f"--load {args.load} on {_who(lost, hosts)} does not hold what rank 0 "
                             f"({hosts[0]}) sees there (tracker or checkpoint files differ); {FIX}")


def missing_files(tmp) -> list:
    """(file, rank that wrote it) for each file the torch_dist checkpoint in `tmp` references
    but this process cannot see whole; [] if complete or not a torch_dist checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isfile(os.path.join(tmp, ".metadata")):
        return []  # e.g. a DeepSpeed checkpoint: only the start-up proof applies
    needed = {}
    for info in FileSystemReader(tmp).read_metadata().storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(end, needed.get(info.relative_path, 0))

    gone = []

    def complete():
        gone.clear()
        for name, size in sorted(needed.items()):
            try:
                whole = os.stat(os.path.join(tmp, name)).st_size >= size
            except OSError:
                whole = False
            if not whole:
                writer = name[2:].split("_")[0] if name.startswith("__") else ""  # __<rank>_<n>.distcp
                gone.append((name, int(writer) if writer.isdigit() else None))
        return not gone

    _retry(complete)
    return gone


def check_complete(tmp, iteration) -> None:
    """After every rank has written `tmp` (iteration's unpublished checkpoint): SetupError on
    every rank if rank 0 cannot see all of its files, so that it is never published."""
    if not _distributed():
        return
    hosts = _gather(socket.gethostname())
    problem = None
    if torch.distributed.get_rank() == 0:
        gone = missing_files(tmp)
        if gone:
            ranks = sorted({r for _, r in gone if r is not None})
            problem = (f"checkpoint of iteration {iteration} not published: {len(gone)} file(s) written by "
                       f"{_who(ranks, hosts) if ranks else 'other ranks'} are missing from {tmp} as rank 0 "
                       f"({hosts[0]}) sees it; --save is not shared storage: {FIX}")
    problem = _broadcast(problem)
    if problem:
        raise SetupError(problem)
