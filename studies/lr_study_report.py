"""Tables and plots of `studies/lr_study.py`: final loss per lr, lr sensitivity per width, and
its slope against width."""

import os
import statistics

from megatron_patch.plotting import pyplot, save_figure
from studies.lr_sensitivity import final_loss, methods_at, run_name, slope_vs_width
from studies.spike_sweep import smoothed_curve, steps_to


def _pm(values, spec=".3f"):
    if not values:
        return "-"
    mean = format(statistics.fmean(values), spec)
    sd = spec.replace("+", "")  # a spread has no sign
    return mean + (f" ± {format(statistics.stdev(values), sd)}" if len(values) > 1 else "")


def write_table(args, results, sens, path, wall_s):
    r = args.recipe
    lines = [f"lr sensitivity study: {r.num_layers} layers, head dim {args.head_dim}, seq {r.seq_length}, "
             f"batch {r.micro_batch_size}, {r.iters} steps (warm-up {r.warmup}, cosine to lr/10), init std "
             f"{'sqrt(2/(5d)) (small init)' if r.init_std is None else r.init_std}, AdamW beta2 {r.adam_beta2}, "
             f"clip {r.clip_grad}, seeds {','.join(map(str, args.seeds))}.", "",
             "lr sensitivity = mean over the lr grid of min(final val loss, loss at init) minus the best "
             "final val loss on the grid (Wortsman et al. 2023), per seed; mean ± sd over seeds (n).", "",
             "| width | " + " | ".join(args.methods) + " |", "|---" * (len(args.methods) + 1) + "|"]
    for d in args.widths:
        cells = []
        for m in args.methods:
            s = sens.get((d, m))
            cells.append("" if s is None else _pm(s["per_seed"]) + f" (n={len(s['per_seed'])})")
        lines.append(f"| d {d} | " + " | ".join(cells) + " |")
    lines += ["", f"High-lr sensitivity (the instability side): the same excess, averaged over the lrs "
              f">= {args.high_from:g} only; mean ± sd over seeds.", "",
              "| width | " + " | ".join(args.methods) + " |", "|---" * (len(args.methods) + 1) + "|"]
    for d in args.widths:
        lines.append(f"| d {d} | " + " | ".join("" if (d, m) not in sens else _pm(sens[d, m]["high_side"])
                                              for m in args.methods) + " |")
    lines += ["", "Slope of lr sensitivity against log2(width) (nats per doubling): of the seed means; "
              "[min, max] over seeds.", "", "| method | slope | per seed |", "|---|---|---|"]
    for m in args.methods:
        slope, per_seed = slope_vs_width(args, sens, m)
        if slope is not None:
            lines.append(f"| {m} | {slope:+.3f} | " + (f"[{min(per_seed):+.3f}, {max(per_seed):+.3f}]"
                                                       if per_seed else "-") + " |")
    lines += [""] + deficit_table(args, sens)
    lrs = sorted(args.lrs)
    lines += ["", "Final validation loss (capped at the loss at init), mean ± sd over seeds; "
              "† = seeds that diverged (loss ended > margin above its best).", "",
              "| width | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
              "|---" * (len(lrs) + 3) + "|"]
    for d in args.widths:
        for m in methods_at(args, d):
            row = []
            for lr in lrs:
                runs = [results[n] for n in (run_name(d, m, lr, s) for s in args.seeds) if n in results]
                div = sum(x["diverged"] for x in runs)
                row.append(_pm([final_loss(x)[0] for x in runs]) + (f" †{div}" if div else ""))
            s = sens.get((d, m))
            lines.append(f"| d {d} | {m} | " + " | ".join(row) + f" | {s['best_lr']:g} |" if s else
                         f"| d {d} | {m} | " + " | ".join(row) + " | - |")
    lines += [""] + baselines_table(args, results, sens)
    run_s = sum(x["seconds"] for x in results.values())
    lines += ["", f"Runs: {len(results)}, {run_s / 60:.0f} run-minutes of training (single-threaded, "
                  f"{args.jobs} at a time); this invocation: {wall_s / 60:.1f} min wall."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def deficits(sens, reference="vanilla"):
    """{(width, method): [reference's best loss on the lr grid - method's best, per seed]} over
    the seeds where both have every lr. [SNM]'s mechanism predicts a gap that grows with d."""
    out = {}
    for (d, m), cell in sens.items():
        ref = sens.get((d, reference))
        if m != reference and ref is not None:
            gaps = [ref["best_per_seed"][s] - best for s, best in cell["best_per_seed"].items()
                    if s in ref["best_per_seed"]]
            if gaps:
                out[d, m] = gaps
    return out


def deficit_table(args, sens, reference="vanilla"):
    gaps, others = deficits(sens, reference), [m for m in args.methods if m != reference]
    lines = [f"{reference}'s deficit: its best final val loss on the lr grid minus each method's best, "
             "paired by seed; mean ± sd (positive = the method beats it).", "",
             "| width | " + " | ".join(others) + " |", "|---" * (len(others) + 1) + "|"]
    for d in args.widths:
        lines.append(f"| d {d} | " + " | ".join(
            _pm(gaps[d, m], "+.3f") + f" (n={len(gaps[d, m])})" if (d, m) in gaps else "" for m in others) + " |")
    return lines


def baselines_table(args, results, sens):
    """Every method at the wide width, each at its own best lr (the [WeSaR] comparison: its
    baselines are small init with residual scaling = vanilla, and without it = xavier): final
    val loss, spikes flagged, largest gradient norm, and speed as the steps each takes to reach a
    training loss every best-lr run reaches (the worst run's final one)."""
    d = args.extra_methods_width
    cells = {m: sens[d, m] for m in methods_at(args, d) if (d, m) in sens}
    if not cells:
        return []

    def best_runs(m):
        return [results[n] for n in (run_name(d, m, cells[m]["best_lr"], s) for s in args.seeds) if n in results]

    # From the stored curves (rounded as saved), so the worst run reaches it at its last step.
    target = max((smoothed_curve(r["curve"]) or [(0, float("inf"))])[-1][1] for m in cells for r in best_runs(m))
    lines = [f"At d {d}, each method at its own best lr: final val loss, spikes flagged by the monitor "
             f"(loss / gradient norm, summed over seeds), the largest gradient norm, and the steps to a "
             f"20-step mean training loss of {target:.3f} (the worst best-lr run's final one); "
             "mean ± sd over seeds (n).", "",
             "| method | best lr | final val loss | loss / grad-norm spikes | max grad norm | steps to target |",
             "|---|---|---|---|---|---|"]
    for m, c in cells.items():
        runs = best_runs(m)
        steps = [steps_to(r["curve"], target) for r in runs]
        reached = [s for s in steps if s is not None]
        lines.append(f"| {m} | {c['best_lr']:g} | {_pm([final_loss(r)[0] for r in runs])} (n={len(runs)}) | "
                     f"{sum(r['loss_spikes'] for r in runs)} / {sum(r['grad_spikes'] for r in runs)} | "
                     f"{max((r['max_grad_norm'] or 0) for r in runs):.1f} | {_pm(reached, '.0f')}"
                     + (f" ({len(steps) - len(reached)} never)" if len(reached) < len(steps) else "") + " |")
    return lines


def plot(args, sens, out):
    plt = pyplot()

    colors = {m: f"C{i}" for i, m in enumerate(args.methods)}  # one color per method in every panel
    widths = [d for d in args.widths if any((d, m) in sens for m in args.methods)]
    if not widths:
        return
    fig, axes = plt.subplots(1, len(widths), figsize=(4.5 * len(widths), 4), sharey=True, squeeze=False)
    for ax, d in zip(axes.flat, widths):
        for m in methods_at(args, d):
            s = sens.get((d, m))
            if s is None:
                continue
            lrs = sorted(s["losses"])
            ys = [statistics.fmean(s["losses"][lr]) for lr in lrs]
            err = [statistics.stdev(s["losses"][lr]) if len(s["losses"][lr]) > 1 else 0 for lr in lrs]
            ax.errorbar(lrs, ys, yerr=err, marker="o", ms=3, capsize=2, lw=1, label=m, color=colors[m])
        ax.set_xscale("log")
        ax.set_title(f"d {d}")
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel("final val loss (capped at init; mean ± sd over seeds)")
    save_figure(fig, os.path.join(out, "final_loss_vs_lr.png"), dpi=110)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4), squeeze=False)
    gaps = deficits(sens)
    panels = ((axes[0, 0], {k: v["per_seed"] for k, v in sens.items()}, "whole lr grid (Wortsman et al.)"),
              (axes[0, 1], {k: v["high_side"] for k, v in sens.items()}, f"lrs >= {args.high_from:g} only"),
              (axes[0, 2], gaps, "vanilla's best loss minus the method's best"))
    for ax, cells, title in panels:
        for m in args.methods:
            pts = [(d, cells[d, m]) for d in args.widths if (d, m) in cells]
            if not pts:
                continue
            ax.errorbar([d for d, _ in pts], [statistics.fmean(v) for _, v in pts],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                        marker="o", capsize=3, lw=1, label=m, color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width d")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("lr sensitivity (nats; mean ± sd over seeds)")
    axes[0, 2].set_ylabel("vanilla's deficit (nats; mean ± sd over seeds)")
    axes[0, 2].axhline(0, color="gray", lw=0.8)
    save_figure(fig, os.path.join(out, "lr_sensitivity_vs_width.png"), dpi=110)
