"""The divergence regime: a CPU-sized setting where Vanilla diverges or spikes repeatedly and the
[SNM] fixes do not, judged by the share of seeds.

Each regime is spike_sweep's recipe plus a few flags that make training harsher in the way the
papers point at: the embedding sigma of a large model at small width ([SNM]'s mechanism: the
LN gradient gain ~ 1/sigma_x grows as the embedding shrinks; sigma 0.0088 is that of d 5120,
0.014 of d 2048 under small init), no gradient clipping, a large lr, long runs. Scaled Embed's
sqrt(d) cannot lift a d-5120 sigma to ~1 at d 64 (0.0088 * 8 = 0.07), so the fixes compared are
Embed LN, Scaled Embed and a sigma = 1 embedding init. Search in two stages: `--seeds 1` over
every regime (the probe), then 3+ seeds on the regimes where Vanilla failed.

    python -m studies.divergence_regime --regimes big_sigma_no_clip --seeds 1,2,3
    python -m studies.divergence_regime --smoke --out /tmp/regime      # seconds (CI)

Runs go to OUT/runs/<regime>_<method>_s<seed>/ and resume like the sweep's. A run "diverged"
when its loss went non-finite or ended > --diverge-margin nats above its best (smoothed) value;
"spiked" when the stability monitor flagged a loss spike (z > --spike-zscore over --spike-window);
"stalled" when its 20-step mean training loss was still within --escape-margin nats of the
corpus's unigram loss (the loss of predicting every token by its frequency: nothing learned from
context) at half the run: at CPU scale a high lr stalls training rather than blowing it up.
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys

from megatron_patch.plotting import pyplot, save_figure
from studies import spike_sweep as sweep
from studies.cli import comma_list, known_names

# init_std None = small init sqrt(2/(5d)); clip 0 = no gradient clipping.
REGIMES = {
    "big_sigma": dict(width=64, lr=1e-2, iters=1000, init_std=0.0088, clip=1.0),
    "big_sigma_no_clip": dict(width=64, lr=1e-2, iters=1000, init_std=0.0088, clip=0.0),
    "no_clip_high_lr": dict(width=64, lr=3e-2, iters=1000, init_std=None, clip=0.0),
    "long_high_lr": dict(width=64, lr=3e-2, iters=2000, init_std=None, clip=1.0),
    # no_clip_high_lr across widths ([SNM]: Vanilla's LN gain ~ 1/sigma grows with d) and with
    # the beta2 most large runs use (0.95, against the recipe's 0.999)
    "no_clip_high_lr_d32": dict(width=32, lr=3e-2, iters=1000, init_std=None, clip=0.0),
    "no_clip_high_lr_d128": dict(width=128, lr=3e-2, iters=1000, init_std=None, clip=0.0),
    "no_clip_high_lr_beta2_0.95": dict(width=64, lr=3e-2, iters=1000, init_std=None, clip=0.0, beta2=0.95),
}
METHODS = {  # name -> flags (on top of the regime's)
    "vanilla": "",
    "embed_layernorm": "--embed-layernorm",
    "scaled_embed": "--scaled-embed",
    "sigma1_embedding": "--embedding-init-method-std 1.0",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/divergence_regime")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="1")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--escape-margin", type=float, default=0.5,
                   help="nats below the unigram loss that count as having left it (see 'stalled')")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--smoke", action="store_true", help="one regime, 2 methods, 8 steps, tiny model")
    args, rest = p.parse_known_args(argv)
    args.recipe = sweep.parse_args(rest + (["--smoke"] if args.smoke else []))
    args.regimes = known_names(p, args.regimes, REGIMES, "regime")
    args.methods = known_names(p, args.methods, METHODS)
    args.seeds = comma_list(args.seeds, int)
    if args.smoke:
        args.regimes, args.methods, args.seeds = args.regimes[:1], args.methods[:2], args.seeds[:1]
    return args


def run_name(regime, method, seed):
    return f"{regime}_{method}_s{seed}"


def describe(args, regime):
    """The setting as trained (--smoke keeps the tiny model and its few steps)."""
    r = dict(REGIMES[regime])
    if args.smoke:
        r.update(width=args.recipe.hidden_size, iters=args.recipe.iters)
    sigma = "small init" if r["init_std"] is None else f"sigma {r['init_std']:g}"
    return f"d {r['width']}, lr {r['lr']:g}, {r['iters']} steps, {sigma}, " + (
        f"clip {r['clip']:g}" if r["clip"] else "no clipping") + (f", beta2 {r['beta2']:g}" if "beta2" in r else "")


def run_argv(args, regime, method, seed, run_dir):
    r = REGIMES[regime]
    recipe = argparse.Namespace(**vars(args.recipe))
    recipe.init_std, recipe.clip_grad = r["init_std"], r["clip"]
    recipe.adam_beta2 = r.get("beta2", recipe.adam_beta2)
    if not args.smoke:
        recipe.hidden_size, recipe.num_attention_heads, recipe.iters = r["width"], max(1, r["width"] // 32), r["iters"]
    recipe.extra = " ".join(x for x in (recipe.extra, METHODS[method]) if x)
    return sweep.training_argv(recipe, "vanilla", r["lr"], seed, run_dir)


def plan(args):
    results, jobs = {}, []
    for seed in args.seeds:
        for regime in args.regimes:
            for method in args.methods:
                name = run_name(regime, method, seed)
                run_dir = os.path.join(args.out, "runs", name)
                sweep.add_run(results, jobs, name, run_dir, lambda: run_argv(args, regime, method, seed, run_dir),
                              args.recipe.diverge_margin, train=not args.report_only)
    return results, jobs


@functools.lru_cache(maxsize=None)  # the table and the plot both ask; the corpus is read once
def unigram_loss(data_prefix):
    """Cross-entropy in nats of the corpus's own token frequencies (None without a corpus)."""
    if not os.path.exists(data_prefix + ".bin"):
        return None
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(data_prefix)
    counts = np.bincount(np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def table(args, results, wall_s):
    h = None if args.smoke else unigram_loss(args.recipe.data_path)
    level = None if h is None else h - args.escape_margin
    lines = ["Divergence regime: share of seeds that diverged / spiked / stalled, per regime and method; "
             "final training loss (20-step mean) and validation loss over the seeds that did not diverge. "
             + ("" if h is None else f"Unigram loss of the corpus {h:.3f}; 'left unigram' = the step whose "
                f"20-step mean training loss first fell below {level:.3f}, per seed (- = never)."), "",
             "| regime | setting | method | seeds | diverged | spiked (loss) | stalled | loss spikes | "
             "grad-norm spikes | max grad norm | left unigram at step | final train loss | final val loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for regime in args.regimes:
        for method in args.methods:
            runs = [results[n] for n in (run_name(regime, method, s) for s in args.seeds) if n in results]
            if not runs:
                continue
            finals = [r["final_train_loss"] for r in runs if not r["diverged"] and r["final_train_loss"] is not None]
            vals = [r["val_loss"] for r in runs if not r["diverged"] and r["val_loss"] is not None]
            final, val = (("-" if not xs else f"{statistics.fmean(xs):.3f}" + (
                f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")) for xs in (finals, vals))
            left = [None if level is None else sweep.steps_to(r["curve"], level) for r in runs]
            half = REGIMES[regime]["iters"] / 2 if not args.smoke else math.inf
            stalled = "-" if level is None else f"{sum(x is None or x > half for x in left)}/{len(runs)}"
            left_s = "-" if level is None else ", ".join("-" if x is None else str(x) for x in left)
            lines.append(f"| {regime} | {describe(args, regime)} | {method} | {len(runs)} | "
                         f"{sum(r['diverged'] for r in runs)}/{len(runs)} | "
                         f"{sum(r['loss_spikes'] > 0 for r in runs)}/{len(runs)} | {stalled} | "
                         f"{sum(r['loss_spikes'] for r in runs)} | {sum(r['grad_spikes'] for r in runs)} | "
                         f"{max((r['max_grad_norm'] or 0) for r in runs):.1f} | {left_s} | {final} | {val} |")
    run_s = sum(r["seconds"] for r in results.values())
    lines += ["", f"Runs: {len(results)}, {run_s / 60:.0f} run-minutes (single-threaded, {args.jobs} at a "
                  f"time); this invocation: {wall_s / 60:.1f} min wall."]
    return "\n".join(lines)


def plot(args, results, out):
    plt = pyplot()

    regimes = [r for r in args.regimes if any(run_name(r, m, s) in results for m in args.methods for s in args.seeds)]
    if not regimes:
        return
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4), squeeze=False)
    colors = dict(zip(METHODS, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    h = None if args.smoke else unigram_loss(args.recipe.data_path)
    for ax, regime in zip(axes.flat, regimes):
        for method in args.methods:
            for i, seed in enumerate(args.seeds):
                r = results.get(run_name(regime, method, seed))
                if r:
                    steps, means = zip(*sweep.smoothed_curve(r["curve"])) if r["curve"] else ((), ())
                    ax.plot(steps, means, lw=0.9, color=colors[method], alpha=0.8, label=method if i == 0 else None)
        if h is not None:
            ax.axhline(h, color="gray", ls="--", lw=0.8, label="unigram loss")
        ax.set_title(f"{regime}\n{describe(args, regime)}", fontsize=8)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("training loss, 20-step mean (every seed)")
    axes.flat[0].legend(fontsize=7)
    save_figure(fig, os.path.join(out, "loss_curves.png"), dpi=110)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results, jobs = plan(args)
    text = table(args, results, sweep.train_all(results, jobs, args.jobs))
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k != "recipe"}, "runs": results}, f)
    print(text)
    if not args.no_plots:
        plot(args, results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
