"""Trainer overhead: tokens/s of pretrain_gpt.py's loop vs a bare megatron-core loop, side by side.

Both train the same model (built by the trainer's own builder) with the same optimizer and the
same megatron-core forward_backward_func; the bare loop feeds pre-built batches and does nothing
else (no data pipeline, logging, bookkeeping). Segments alternate (trainer, bare, trainer, ...)
so drifts in machine speed hit both; the median step time of each is compared.

    python -m benchmarks.bench_trainer            # ~2 minutes on 2 CPU cores
    python -m benchmarks.bench_trainer --quick    # smaller, ~20 s
"""

import argparse
import itertools
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

from megatron_patch.training import initialize  # noqa: E402
from megatron_patch.training.arguments import parse_and_validate  # noqa: E402
from megatron_patch.training.callbacks import Callback  # noqa: E402
from megatron_patch.training.logging import training_flops_per_token  # noqa: E402
from megatron_patch.training.loop import _forward_backward  # noqa: E402
from megatron_patch.training.pretrain import build, run  # noqa: E402


def model_argv(quick, iters):
    layers, hidden, seq = (2, 128, 64) if quick else (4, 256, 256)
    return [str(a) for a in (
        "--num-layers", layers, "--hidden-size", hidden, "--num-attention-heads", 4,
        "--seq-length", seq, "--max-position-embeddings", seq, "--micro-batch-size", 4,
        "--global-batch-size", 8, "--train-iters", iters, "--lr", 1e-3, "--lr-warmup-iters", 1,
        "--hidden-dropout", 0.1, "--attention-dropout", 0.1, "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", 4095, "--eval-iters", 0,
        "--log-interval", iters)]


class StepClock(Callback):
    def on_train_start(self, state):
        self.marks = [time.perf_counter()]

    def on_step_end(self, state):
        self.marks.append(time.perf_counter())


def trainer_step_times(argv):
    clock = StepClock()
    run(argv, callbacks=[clock])
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])]


def bare_step_times(argv, iters):
    args = parse_and_validate(argv)
    ctx, _, iterators = build(args)
    batches = [next(iterators["train"][0]) for _ in range(args.num_microbatches)]
    data = [itertools.cycle(batches)]
    times = []
    try:
        for _ in range(iters):
            t0 = time.perf_counter()
            for chunk in ctx.model:
                chunk.zero_grad_buffer()
            ctx.optimizer.zero_grad()
            _forward_backward(ctx, data, forward_only=False)
            ctx.optimizer.step()
            times.append(time.perf_counter() - t0)
    finally:
        for its in iterators.values():
            for it in its or []:
                it.close()
        initialize.teardown()
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--iters", type=int, default=None, help="steps per segment")
    p.add_argument("--repeats", type=int, default=3, help="segments of each kind")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped per segment")
    opts = p.parse_args()
    iters = opts.iters or (30 if opts.quick else 12)
    argv = model_argv(opts.quick, iters)
    args = parse_and_validate(argv)
    tokens = args.global_batch_size * args.seq_length
    trainer, bare = [], []
    for _ in range(opts.repeats):
        trainer += trainer_step_times(argv)[opts.warmup:]
        bare += bare_step_times(argv, iters)[opts.warmup:]
    t, b = statistics.median(trainer), statistics.median(bare)
    gflop = training_flops_per_token(args, 4096) * tokens / 1e9
    print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, "
          f"global batch {args.global_batch_size}, {gflop:.2f} GFLOP/step; "
          f"{opts.repeats} x {iters - opts.warmup} timed steps each")
    print(f"pretrain_gpt.py loop : {tokens / t:9.1f} tokens/s  ({t * 1e3:.1f} ms/step, {gflop / t:.1f} GFLOP/s)")
    print(f"bare megatron-core   : {tokens / b:9.1f} tokens/s  ({b * 1e3:.1f} ms/step, {gflop / b:.1f} GFLOP/s)")
    print(f"ratio trainer/bare   : {100.0 * b / t:.1f}%  (target >= 95%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
