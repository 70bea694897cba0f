"""Learning-rate sensitivity across widths: the small-scale proxy of Wortsman et al. (arXiv 2309.14322)
applied to the stabilizations of [SNM] and [WeSaR].

Over a log grid of peak learning rates, a method's *lr sensitivity* at one width is

    mean over the grid of  min(final loss(lr), loss at init) - min over the grid of final loss(lr)

(Wortsman et al. §3.2; "final loss" = validation loss at the end, "loss at init" = the run's
first-step loss, so a run that blew up counts as no progress at all). [SNM]'s mechanism predicts
that Vanilla's sensitivity rises with width d (the shallow LNs' gradient gain is ~1/sigma_x and
sigma = sqrt(2/(5d)) shrinks with d, [SNM v2] Eq. 9-10, v4 Eq. 12-14 [unverified]) while Scaled Embed's and Embed LN's stay
flat. The figure is computed per seed (the same seed at every lr), then reported as mean ± sd,
with its slope against log2(d).

Every run is a real `pretrain_gpt.py` training from `benchmarks/spike_sweep.py` (same recipe:
8 layers, seq 128, batch 8, AdamW, cosine schedule, monitor in log mode), with head dim 32 at
every width. Runs go to OUT/runs/<name>/; finished ones are not re-run, so an interrupted study
resumes (each run's result.json, curve included, is committed, so a later session on another
machine continues the grid). Runs of earlier sweeps are not imported even when their flags
match: the same flags on another machine agreed to the last digit for 18 steps, then drifted
apart by float rounding to 0.08 nats of final loss at lr 1e-2 — as large as a change of seed.
A run is one sample of that noise; the seed spread reported covers it.

    PYTHONPATH=. python benchmarks/lr_study.py --out results/lr_study --jobs 2
    PYTHONPATH=. python benchmarks/lr_study.py --smoke --out /tmp/lr_study      # seconds (CI)
"""

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import spike_sweep as sweep  # noqa: E402

# label -> (spike_sweep method, extra settings). Every width gets the first three; WIDE_ONLY
# methods run at --extra-methods-width only (the budget: they answer "how does X compare", not
# "how does it scale").
EVERY_WIDTH = ("vanilla", "scaled_embed", "embed_layernorm")
METHODS = {
    "vanilla": ("vanilla", {}),
    "scaled_embed": ("scaled_embed", {}),
    "embed_layernorm": ("embed_layernorm", {}),
    "xavier": ("plain_init", {}),                       # [SNM v4]'s name for no depth scaling
    "wesar": ("wesar", {}),                             # common sigma^2 = 4e-5 ([WeSaR])
    "wesar_init_sigma": ("wesar", {"wesar_sigma": "init"}),  # common sigma = the init's sigma
    "wesar_he": ("wesar", {"flags": "--wesar-targets he"}),  # [WeSaR]'s He backbone [unverified]
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/lr_study")
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--extra-methods-width", type=int, default=128,
                   help="the one width where methods beyond vanilla/scaled_embed/embed_layernorm run")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2,1e-1")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--high-from", type=float, default=1e-2,
                   help="lrs from this one up make the high-lr sensitivity (the instability side)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="train nothing; tabulate what is done")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--smoke", action="store_true", help="two tiny widths, 2 lrs, 1 seed, 6 steps")
    args, rest = p.parse_known_args(argv)
    # The training recipe's flags are spike_sweep's (--iters, --seq-length, --adam-beta2, ...).
    args.recipe = sweep.parse_args(rest + (["--smoke"] if args.smoke else []))
    args.widths = [int(x) for x in args.widths.split(",") if x]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.lrs = [float(x) for x in args.lrs.split(",") if x]
    args.seeds = [int(x) for x in args.seeds.split(",") if x]
    if args.smoke:
        args.widths, args.lrs, args.seeds, args.extra_methods_width = [32, 64], [1e-3, 1e-2], [1], 64
    bad = [d for d in args.widths if d % args.head_dim]
    if bad:
        p.error(f"width(s) {bad} are not multiples of --head-dim {args.head_dim}")
    return args


def methods_at(args, width):
    return [m for m in args.methods if m in EVERY_WIDTH or width == args.extra_methods_width]


def run_name(width, method, lr, seed):
    return f"d{width}_{method}_lr{lr:g}_s{seed}"


def init_std(recipe, width):
    """The init sigma of every matrix: --init-std, else [SNM]'s small init sqrt(2/(5d))."""
    return recipe.init_std if recipe.init_std is not None else math.sqrt(2 / (5 * width))


def run_argv(args, width, method, lr, seed, run_dir):
    base, extra = METHODS[method]
    recipe = argparse.Namespace(**vars(args.recipe))
    recipe.hidden_size, recipe.num_attention_heads = width, width // args.head_dim
    if extra.get("wesar_sigma") == "init":
        recipe.wesar_init_std = round(init_std(recipe, width), 7)
    recipe.extra = " ".join(x for x in (recipe.extra, extra.get("flags", "")) if x)
    return sweep.training_argv(recipe, base, lr, seed, run_dir)


def plan(args):
    """(results so far, jobs to train). Seed-major order: a study cut short still has every
    (width, method, lr) cell for its first seeds; WeSaR runs go last."""
    results, jobs = {}, []
    order = sorted(((m.startswith("wesar"), s, d, m, lr) for s in args.seeds for d in args.widths
                    for m in methods_at(args, d) for lr in sorted(args.lrs, reverse=True)))
    for _, seed, width, method, lr in order:
        name = run_name(width, method, lr, seed)
        run_dir = os.path.join(args.out, "runs", name)
        sweep.add_run(results, jobs, name, run_dir, lambda: run_argv(args, width, method, lr, seed, run_dir),
                      args.recipe.diverge_margin, train=not args.report_only)
    return results, jobs


def final_loss(run):
    """(validation loss capped at the loss at init, loss at init); a run with no finite
    validation loss counts as the loss at init."""
    first = next((c[1] for c in run["curve"] if c[1] is not None), None)
    init = first if first is not None else float("nan")
    val = run.get("val_loss")
    return (init if val is None else min(val, init)), init


def sensitivity(args, results):
    """{(width, method): {"per_seed": [...], "best_per_seed": {seed: best}, "mean", "sd", "high_side": [...], "best_lr",
    "losses": {lr: [per seed]}}}
    over the (width, method) cells whose every lr is done for at least one seed."""
    out = {}
    for width in args.widths:
        for method in methods_at(args, width):
            losses, per_seed, high_side, best_of = {lr: [] for lr in args.lrs}, [], [], {}
            lrs = sorted(args.lrs)
            for seed in args.seeds:
                runs = [results.get(run_name(width, method, lr, seed)) for lr in lrs]
                if any(r is None for r in runs):
                    continue
                capped = [final_loss(r)[0] for r in runs]
                for lr, v in zip(lrs, capped):
                    losses[lr].append(v)
                best = best_of[seed] = min(capped)
                per_seed.append(statistics.fmean(capped) - best)
                # The instability side alone: the same excess over the grid's top lrs only (at the
                # bottom, the excess measures too few steps, not instability).
                top = [v for lr, v in zip(lrs, capped) if lr >= args.high_from]
                high_side.append(statistics.fmean(top) - best if top else float("nan"))
            if per_seed:
                means = {lr: statistics.fmean(v) for lr, v in losses.items()}
                out[width, method] = dict(per_seed=per_seed, best_per_seed=best_of, mean=statistics.fmean(per_seed),
                                          sd=statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                                          high_side=high_side,
                                          best_lr=min(means, key=means.get), best_loss=min(means.values()),
                                          losses=losses)
    return out


def slope_vs_width(args, sens, method):
    """Least-squares slope of lr sensitivity against log2(width): (of the seed means, [per seed])."""
    widths = [d for d in args.widths if (d, method) in sens]
    if len(widths) < 2:
        return None, []

    def fit(ys):
        xs = [math.log2(d) for d in widths]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    n = min(len(sens[d, method]["per_seed"]) for d in widths)
    return fit([sens[d, method]["mean"] for d in widths]), [
        fit([sens[d, method]["per_seed"][i] for d in widths]) for i in range(n)]


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results, jobs = plan(args)
    wall = sweep.train_all(results, jobs, args.jobs)
    from benchmarks import lr_study_report as report
    sens = sensitivity(args, results)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k != "recipe"},
                   "recipe": vars(args.recipe), "runs": results}, f)
    print(report.write_table(args, results, sens, os.path.join(args.out, "table.md"), wall))
    if not args.no_plots:
        report.plot(args, sens, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
