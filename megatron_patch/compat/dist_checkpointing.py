"""Synchronous dist_checkpointing saves without a spawn-context manager process.

megatron-core's torch_dist writer (0.16.1 to 0.19.x,
`dist_checkpointing/strategies/filesystem_async.py`) collects write results through a queue made
by `multiprocessing.get_context("spawn").Manager()`, created on the first save of every process,
even for synchronous saves. That manager is a new
Python process that re-imports the `__main__` module: it costs seconds at the first save of each
rank, and without an `if __name__ == "__main__":` guard in the entry script the save fails or
hangs (facts §2.8).

For synchronous saves the queue is written and read by the same process, so a plain in-process
`queue.Queue` does the same job. `use_in_process_results_queue()` installs one. It must not be
combined with `async_sharded_save=True` (the trainer never saves asynchronously). Not CPU-specific:
it applies on GPU too.
"""

import queue


def use_in_process_results_queue() -> None:
    """Idempotent. Replaces upstream's lazily created manager queue with an in-process queue."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
