"""torchrun worker: load a trainer checkpoint at another layout and save it again, unchanged.

    torchrun --nproc-per-node 2 reshard_worker.py SPEC.json

SPEC.json: [argv, ...], each the trainer's flags with --load (any layout) and --save; the model
is loaded at this run's TP/PP through megatron-core's resharding and written back at that layout.
"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

from megatron_patch.training import checkpointing, initialize  # noqa: E402
from megatron_patch.training.arguments import parse_and_validate  # noqa: E402
from megatron_patch.training.pretrain import build  # noqa: E402

if __name__ == "__main__":
    for argv in json.loads(open(sys.argv[1]).read()):
        args = parse_and_validate(argv)
        os.makedirs(args.save, exist_ok=True)  # as run()'s save_dir.prepare does before build()
        ctx, state, iters = build(args)
        assert ctx.resumed, "nothing loaded"
        checkpointing.save_checkpoint(ctx, state)
        for its in iters.values():
            for it in its or []:
                it.close()
        initialize.teardown()
