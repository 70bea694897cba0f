"""Train several methods in one process, in turn, and record each run's step time and peak memory
(driven by tests/gpu/check.py's step_time part).

    python tests/gpu/step_time.py SPEC.json OUT.json

SPEC: {"base": [flags], "methods": {name: [extra flags]}, "rounds": N}. The runs go round by round
(vanilla, scaled_embed, ..., then again), so clock and thermal drift hit every method alike. Each
run is pretrain_gpt.py's own `run` with its stdout captured; its figures are those of its last
log line (the second half of the run with --log-interval = iterations / 2). Peak memory is the CUDA
allocator's, reset before each run (on CPU: the process's resident memory, which only grows).
"""

import contextlib
import gc
import io
import json
import sys
import warnings
from pathlib import Path

import torch

from megatron_patch.training.pretrain import run
from tests.gpu.check import last_log_line

# Run by check.py with the repository root on PYTHONPATH (the lent machine has the package
# uninstalled). megatron-core's import-time notices that apex/TE are absent: check.py lists them.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")


def one_run(argv) -> dict:
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            run(argv)
    except BaseException as exc:  # noqa: BLE001 - recorded; the other methods still run
        print(captured.getvalue(), flush=True)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    print(captured.getvalue(), flush=True)  # into the part's log
    return {"ok": True, **last_log_line(captured.getvalue())}


def main(spec_path, out_path) -> int:
    spec = json.loads(Path(spec_path).read_text())
    runs = []
    for r in range(spec["rounds"]):
        for name, extra in spec["methods"].items():
            print(f"=== round {r}: {name}", flush=True)
            runs.append({"method": name, "round": r, **one_run(spec["base"] + extra)})
            Path(out_path).write_text(json.dumps(runs, indent=1))  # what finished, if a later run hangs
    return 0 if all(x["ok"] for x in runs) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
