"""DeepSpeed engine vs Megatron engine: tokens/s of pretrain_gpt.py, same model, same layout (DP=2).

Both train bench_trainer.py's model on the same mock data with 2 data-parallel processes
(torchrun, gloo on CPU): megatron-core's DDP and optimizer, and --deepspeed with ZeRO stages 1, 2
and 3 (examples/deepspeed/zero*.json). Segments alternate inside one launch (megatron, zero1,
zero2, zero3, megatron, ...), so drifts in machine speed hit every engine; the median step time
of each is compared with the Megatron engine's.

    python -m benchmarks.bench_deepspeed            # ~4 minutes on 2 CPU cores
    python -m benchmarks.bench_deepspeed --quick    # smaller, ~1 minute
"""

import argparse
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "deepspeed"
ENGINES = {"megatron-core DDP": []} | {
    f"DeepSpeed ZeRO-{k}": ["--deepspeed", "--deepspeed-config", str(EXAMPLES / f"zero{k}.json")] for k in (1, 2, 3)}


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--iters", type=int, default=None, help="steps per segment")
    p.add_argument("--repeats", type=int, default=3, help="segments of each engine")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped per segment")
    return p.parse_args()


def launch() -> int:
    """Re-run this module under torchrun with 2 processes (one core each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", __spec__.name, *sys.argv[1:]]
    return subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


def worker(opts) -> int:
    import torch

    from benchmarks.bench_trainer import model_argv, trainer_step_times
    from megatron_patch.training.arguments import parse_and_validate
    from megatron_patch.training.logging import training_flops_per_token

    iters = opts.iters or (20 if opts.quick else 12)
    argv = model_argv(opts.quick, iters)
    times = {name: [] for name in ENGINES}
    for _ in range(opts.repeats):
        for name, flags in ENGINES.items():
            times[name] += trainer_step_times(argv + flags)[opts.warmup:]
    if torch.distributed.get_rank() != 0:
        return 0
    args = parse_and_validate(argv, world_size=2)
    tokens = args.global_batch_size * args.seq_length
    gflop = training_flops_per_token(args, 4096) * tokens / 1e9
    print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, global batch "
          f"{args.global_batch_size} (DP=2 x micro-batch {args.micro_batch_size}), {gflop:.2f} GFLOP/step; "
          f"{opts.repeats} x {iters - opts.warmup} timed steps per engine, interleaved")
    reference = statistics.median(times["megatron-core DDP"])
    for name, samples in times.items():
        t = statistics.median(samples)
        print(f"{name:18s}: {tokens / t:9.1f} tokens/s  ({t * 1e3:7.1f} ms/step)  "
              f"ratio to megatron-core: {reference / t:.3f}")
    return 0


def main() -> int:
    opts = parse()
    return worker(opts) if "RANK" in os.environ else launch()


if __name__ == "__main__":
    sys.exit(main())
