"""Stability-monitor overhead: training tokens/s with the monitor at a typical interval vs off.

Same model and data (mock tokens), run in alternating segments (off, on, off, on, ...) in one
process so machine drift hits both; compares the median step time. "On" means what a user would
run: `--monitor-interval 100 --spike-policy skip` (one compact record and a grad-norm check every
step, per-layer statistics every 100 steps).

    python -m benchmarks.bench_monitor [--iters 60 --rounds 3 --interval 100]
        [--distributed-optimizer]   (the paper configs' optimizer; the monitor reads its shards)
        [--profile]                 also: one "on" run under cProfile, the time spent inside the
                                    monitor's hooks as a share of the whole run (noise-free)
"""

import argparse
import statistics
import warnings

warnings.filterwarnings("ignore")

from benchmarks.bench_trainer import model_argv, trainer_step_times  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    base = model_argv(args.quick, args.iters) + (["--use-distributed-optimizer"] if args.distributed_optimizer else [])
    monitor = ["--monitor-interval", str(args.interval), "--spike-policy", "skip",
               "--monitor-dir", "/tmp/bench_monitor"]
    times = {"off": [], "on": []}
    for _ in range(args.rounds):
        for name, extra in (("off", []), ("on", monitor)):
            times[name] += trainer_step_times(base + extra)[2:]  # drop warm-up steps
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"median step: monitor off {off * 1e3:.1f} ms, on (interval {args.interval}) {on * 1e3:.1f} ms; "
          f"throughput ratio on/off = {off / on:.3f} (overhead {(on / off - 1) * 100:+.1f}%)")
    if args.profile:
        profile_share(base + monitor)


def profile_share(argv):
    """Run once under cProfile; report the cumulative time of the monitor's trainer hooks."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    trainer_step_times(argv)
    profiler.disable()
    stats = pstats.Stats(profiler)
    hooks = ("on_step_start", "on_before_optimizer_step", "on_step_end")
    total = max(v[3] for v in stats.stats.values())  # the outermost call's cumulative time
    in_monitor = sum(v[3] for (path, _, name), v in stats.stats.items()
                     if name in hooks and path.endswith("monitor/callback.py"))
    print(f"profile: monitor hooks {in_monitor:.2f} s of {total:.2f} s ({100 * in_monitor / total:.2f}%)")


if __name__ == "__main__":
    main()
