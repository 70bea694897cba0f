"""One line for a checkpoint that failed to load, from whatever the loader raised."""

import os


def describe(exc) -> str:
    """One line for a failed load: torch's CheckpointException only says which ranks failed, so
    name the first rank's own exception (a truncated .distcp, a missing shard, ...)."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, EOFError):
            return f"rank {rank}: a tensor file (.distcp) ended early: truncated (EOFError)"
        if "metadata read failed" in str(inner):  # how torch.distributed.checkpoint reports a bad .metadata
            return (f"its .metadata or common state is truncated or corrupt "
                    f"({type(inner).__name__}: {first_line(inner)})")
        return f"rank {rank}: {type(inner).__name__}: {first_line(inner)}"
    if type(exc).__name__ in ("UnpicklingError", "EOFError"):
        return f"its .metadata or common state is truncated or corrupt ({type(exc).__name__}: {first_line(exc)})"
    return f"{type(exc).__name__}: {first_line(exc)}"


def first_line(exc) -> str:
    """The exception's first line, at most 300 characters."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def earlier_checkpoints_hint(path) -> str:
    """'; earlier checkpoints: 2, 4 (--ckpt-step N)' when the same directory has others."""
    root, name = os.path.split(path.rstrip("/"))
    others = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit()
                    and d != name)
    return f"; earlier checkpoints: {', '.join(map(str, others))} (resume one with --ckpt-step N)" if others else ""


def explain(exc, path) -> str:
    """What went wrong loading the checkpoint at `path`, and which others the directory holds."""
    return describe(exc) + earlier_checkpoints_hint(path)
