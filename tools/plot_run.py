"""Plot and summarise training runs: loss curves with spikes marked, per-layer gradient heatmaps.

Each run is NAME=PATH where PATH is a monitor directory (holding monitor.jsonl, written by
`pretrain_gpt.py --monitor-interval K`), a monitor .jsonl file, or a pretrain_gpt.py / Megatron-LM
stdout log (loss curve only).

    python tools/plot_run.py --run vanilla=runs/vanilla --run scaled=runs/scaled --output-dir plots
    python tools/plot_run.py --run vanilla=runs/vanilla --summary        # table only, no matplotlib

Writes loss.png (all runs on one figure, spikes as red crosses) and, for runs with per-layer
records, NAME_grad_heatmap.png (layers x steps, log10 of each layer's attention+FFN grad norm).
"""

import argparse
import json
import math
import os
import re
import statistics
import sys

from megatron_patch.plotting import pyplot, save_figure

LOG_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+|nan|inf)", re.IGNORECASE)
GRAD_NORM = re.compile(r"grad norm: ([0-9.eE+-]+|nan|inf)")


def load_run(path):
    """{'steps': [{'iteration', 'loss', 'grad_norm_total', 'skipped', 'spikes', ...}]}"""
    if os.path.isdir(path):
        path = os.path.join(path, "monitor.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist (give a monitor directory, a monitor.jsonl or a training log)")
    with open(path, encoding="utf-8") as f:
        first = f.readline()
        f.seek(0)
        if first.lstrip().startswith("{"):
            steps = [json.loads(line) for line in f if line.strip()]
        else:
            steps = []
            for line in f:
                m = LOG_LINE.search(line)
                if m:
                    g = GRAD_NORM.search(line)
                    steps.append({"iteration": int(m.group(1)), "loss": float(m.group(2)),
                                  "grad_norm_total": float(g.group(1)) if g else None})
    if not steps:
        sys.exit(f"error: no training steps found in {path}")
    # A rollback re-runs iterations: keep the last record of each.
    by_iter = {s["iteration"]: s for s in steps}
    spikes = [e for s in steps for e in s.get("spikes", [])]
    return {"steps": [by_iter[i] for i in sorted(by_iter)], "spikes": spikes,
            "skipped": sum(bool(s.get("skipped")) for s in steps)}


def summary_row(name, run):
    losses = [s["loss"] for s in run["steps"] if s.get("loss") is not None and math.isfinite(s["loss"])]
    norms = [s["grad_norm_total"] for s in run["steps"] if s.get("grad_norm_total") is not None]
    tail = losses[-max(1, len(losses) // 10):]
    return dict(run=name, steps=run["steps"][-1]["iteration"], final_loss=statistics.fmean(tail),
                min_loss=min(losses), max_grad_norm=max(norms) if norms else float("nan"),
                spikes=len(run["spikes"]), skipped=run["skipped"])


def print_summary(runs):
    print(f"{'run':<18}{'steps':>7}{'final loss':>12}{'min loss':>10}{'max |g|':>10}{'spikes':>8}{'skipped':>9}")
    for name, run in runs.items():
        r = summary_row(name, run)
        print(f"{r['run']:<18}{r['steps']:>7}{r['final_loss']:>12.4f}{r['min_loss']:>10.4f}"
              f"{r['max_grad_norm']:>10.3g}{r['spikes']:>8}{r['skipped']:>9}")


def plot_losses(runs, out):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, run in runs.items():
        xs = [s["iteration"] for s in run["steps"] if s.get("loss") is not None]
        ys = [s["loss"] for s in run["steps"] if s.get("loss") is not None]
        ax.plot(xs, ys, label=name, linewidth=1)
        spike_iters = {e["iteration"] for e in run["spikes"]}
        sx = [s["iteration"] for s in run["steps"] if s["iteration"] in spike_iters and s.get("loss") is not None]
        sy = [s["loss"] for s in run["steps"] if s["iteration"] in spike_iters and s.get("loss") is not None]
        if sx:
            ax.scatter(sx, sy, marker="x", color="red", zorder=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title("training loss (red x: detected spikes)")
    ax.legend()
    save_figure(fig, out, dpi=120)


def grad_heatmap(name, run, out) -> bool:
    plt = pyplot()
    measured = [s for s in run["steps"] if "grad_norm" in s]
    if not measured:
        return False
    layers = sorted({k.split("/")[0] for k in measured[0]["grad_norm"] if k.startswith("layer")})
    grid = [[math.log10(max(1e-12, math.hypot(s["grad_norm"].get(f"{layer}/attention", 0.0),
                                              s["grad_norm"].get(f"{layer}/ffn", 0.0))))
             for s in measured] for layer in layers]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(layers) + 2))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                   extent=(measured[0]["iteration"], measured[-1]["iteration"], 0.5, len(layers) + 0.5))
    ax.set_xlabel("iteration")
    ax.set_ylabel("layer")
    ax.set_title(f"{name}: log10 grad norm (attention + FFN) per layer")
    fig.colorbar(im, ax=ax)
    save_figure(fig, out, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--output-dir", default=None, help="Write PNGs here (omit for --summary only).")
    ap.add_argument("--summary", action="store_true", help="Print a table of the runs.")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.run:
        if "=" not in spec:
            sys.exit(f"error: --run {spec!r} must be NAME=PATH")
        name, path = spec.split("=", 1)
        runs[name] = load_run(path)
    if args.summary or not args.output_dir:
        print_summary(runs)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        plot_losses(runs, os.path.join(args.output_dir, "loss.png"))
        written = ["loss.png"] + [f"{n}_grad_heatmap.png" for n, r in runs.items()
                                  if grad_heatmap(n, r, os.path.join(args.output_dir, f"{n}_grad_heatmap.png"))]
        print(f"wrote {', '.join(written)} to {args.output_dir}")


if __name__ == "__main__":
    main()
