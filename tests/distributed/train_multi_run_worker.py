"""torchrun worker: several training runs in one launch (process start-up is the slow part).

    torchrun --nproc-per-node 2 train_multi_run_worker.py SPEC.json OUT_DIR

SPEC.json: [{"name": ..., "argv": [...]}, ...]. Each run's per-iteration history goes to
OUT_DIR/<name>.rank<R>.json (losses are null off the last pipeline stage); a SetupError is
recorded as {"error": message}.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

from megatron_patch.training.errors import SetupError  # noqa: E402
from megatron_patch.training.pretrain import run  # noqa: E402

if __name__ == "__main__":
    import torch

    spec, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    for item in spec:
        try:
            result = {"history": run(item["argv"]).history}
        except SetupError as exc:
            result = {"error": str(exc)}
        rank = torch.distributed.get_rank()
        with open(f"{out}/{item['name']}.rank{rank}.json", "w") as f:
            json.dump(result, f)
        torch.distributed.barrier()
