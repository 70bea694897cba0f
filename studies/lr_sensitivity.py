"""The lr study's measure: lr sensitivity per (width, method) as Wortsman et al. define it (see
lr_study.py), and its slope against width; with the run names of the grid it is read from.
lr_study.py trains the grid, lr_study_report.py tabulates and plots what this computes."""

import math
import statistics

# The methods run at every width of the grid; the others only at --extra-methods-width.
EVERY_WIDTH = ("vanilla", "scaled_embed", "embed_layernorm")


def methods_at(args, width):
    return [m for m in args.methods if m in EVERY_WIDTH or width == args.extra_methods_width]


def run_name(width, method, lr, seed):
    return f"d{width}_{method}_lr{lr:g}_s{seed}"


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
