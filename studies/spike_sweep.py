"""Spike sweep: small GPTs trained with each stabilization over a grid of learning rates and seeds.

Every run is a real `pretrain_gpt.py` training (same trainer, same megatron-core schedules) with
the stability monitor in `--spike-policy log` mode, so spikes are counted by the same detector a
user's run would use. Per run it records: the per-step loss and grad-norm curve, the final
validation loss, the spikes the monitor flagged (loss and grad-norm), the largest grad norm and
whether the run diverged (non-finite loss, or a loss that ends > --diverge-margin nats above its
best smoothed value and never came back). Then it writes a markdown table and two plots:

    results.json         every run's summary and (thinned) curves
    table.md             per method x lr: seeds, diverged, spikes, max grad norm, val loss
    loss_curves.png      per method, the loss curve at the highest lr where no seed diverged
    loss_by_lr.png       per lr, every method's loss curve (mean over seeds)
    val_loss_vs_lr.png   best validation loss (mean over seeds) vs lr, per method

    python -m studies.spike_sweep --out results/spike_sweep     # the full sweep
    python -m studies.spike_sweep --smoke --out /tmp/sweep        # seconds (CI)

Runs go to OUT/runs/<name>/ (log, monitor.jsonl, result.json); a finished run is not re-run, so
an interrupted sweep continues where it stopped. `--jobs N` trains N runs at once, each on one
thread (two single-threaded processes beat one two-threaded one on small models).
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from megatron_patch.training.callbacks import Callback

from megatron_patch.plotting import pyplot, save_figure
from studies.cli import comma_list, known_names

# [SNM] = Takase et al., "Spike No More"; [WeSaR] = Nishida et al. Vanilla is the usual Megatron
# recipe (scaled init, small embeddings); each method adds one flag of this package.
METHODS = {
    "vanilla": [],
    "plain_init": ["--init-style", "plain"],             # [SNM] baseline: no 1/sqrt(2N) on W_O, W_2
    "embed_detach": ["--embed-detach-alpha", "0.1"],     # [SNM] baseline (GLM-130B)
    "embed_layernorm": ["--embed-layernorm"],            # [SNM] fix
    "scaled_embed": ["--scaled-embed"],                  # [SNM] fix
    "wesar": ["--wesar"],                                # [WeSaR]; common std via --wesar-init-std
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/spike_sweep")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--init-std", type=float, default=None,
                   help="sigma of every matrix and the embedding (default: [SNM]'s small init "
                        "sqrt(2/(5d)), --small-init; 0.02 is Megatron's default = [SNM]'s sigma at d=1024)")
    p.add_argument("--wesar-init-std", type=float, default=0.0063246,
                   help="WeSaR's common std ([WeSaR]: sigma^2 = 4e-5)")
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--data-path", default="data/quickstart/wiki_text_document")
    p.add_argument("--tokenizer-model", default="data/quickstart/tok.model")
    p.add_argument("--spike-zscore", type=float, default=6.0)
    p.add_argument("--spike-window", type=int, default=64)
    p.add_argument("--diverge-margin", type=float, default=1.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--extra", default="", help="more pretrain_gpt.py flags for every run (one string)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, random tokens, 1 lr, 1 seed, 6 steps: checks the whole pipeline")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.methods = known_names(p, args.methods, METHODS)
    args.lrs, args.seeds = comma_list(args.lrs, float), comma_list(args.seeds, int)
    if args.smoke:
        args.lrs, args.seeds, args.iters, args.warmup = args.lrs[:1], args.seeds[:1], 6, 2
        args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length = 2, 64, 4, 32
        args.micro_batch_size, args.eval_iters, args.spike_window = 2, 2, 8
    elif not os.path.exists(args.data_path + ".idx"):
        p.error(f"{args.data_path}.idx not found; run `bash examples/quickstart.sh` once (it builds "
                f"data/quickstart) or pass --data-path/--tokenizer-model")
    return args


def run_name(method, lr, seed):
    return f"{method}_lr{lr:g}_s{seed}"


def training_argv(args, method, lr, seed, run_dir):
    """pretrain_gpt.py flags of one run: a GPT-2 style pre-LN decoder, AdamW, cosine schedule."""
    s = args.seq_length
    argv = ["--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
            "--num-attention-heads", args.num_attention_heads, "--seq-length", s,
            "--max-position-embeddings", s, "--micro-batch-size", args.micro_batch_size,
            "--global-batch-size", args.micro_batch_size,
            "--untie-embeddings-and-output-weights",  # facts §6: tied embeddings grow fast under Adam
            *(["--small-init"] if args.init_std is None else ["--init-method-std", args.init_std]),
            "--lr", lr, "--min-lr", lr / 10, "--lr-decay-style", "cosine",
            "--lr-warmup-iters", args.warmup, "--train-iters", args.iters,
            "--adam-beta1", 0.9, "--adam-beta2", args.adam_beta2, "--clip-grad", args.clip_grad,
            "--weight-decay", args.weight_decay, "--hidden-dropout", 0, "--attention-dropout", 0,
            "--seed", seed, "--log-interval", max(1, args.iters // 10),
            "--eval-interval", args.iters, "--eval-iters", args.eval_iters,
            "--monitor-dir", run_dir, "--spike-policy", "log", "--spike-zscore", args.spike_zscore,
            "--spike-window", args.spike_window, "--spike-min-history", min(16, args.spike_window)]
    if args.smoke:
        argv += ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", 1023]
    else:
        argv += ["--data-path", args.data_path, "--split", "98,2,0",
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", args.tokenizer_model]
    argv += METHODS[method]
    if method == "wesar":
        argv += ["--wesar-init-std", args.wesar_init_std]
    argv += args.extra.split()
    return [str(a) for a in argv]


class Diverged(Exception):
    pass


class Recorder(Callback):
    """Keeps the loss curve and the validation loss; stops a run whose loss stays non-finite."""

    def __init__(self, patience=10):
        self.curve, self.val_loss, self.patience, self.bad = [], None, patience, 0

    def on_step_end(self, state):
        loss, norm = state.loss, state.grad_norm
        self.curve.append((state.iteration, loss, norm))
        self.bad = 0 if loss is not None and math.isfinite(loss) else self.bad + 1
        if self.bad >= self.patience:
            raise Diverged(f"loss non-finite for {self.bad} steps at iteration {state.iteration}")

    def on_eval_end(self, state, metrics):
        self.val_loss = metrics["lm loss"]


def _smoothed(values, k=20):
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def smoothed_curve(curve, k=20):
    """[(step, mean of the last k finite training losses)] along a stored curve."""
    finite = [(c[0], c[1]) for c in curve if c[1] is not None and math.isfinite(c[1])]
    return list(zip((step for step, _ in finite), _smoothed([x for _, x in finite], k)))


def steps_to(curve, target, k=20):
    """First step whose k-step mean training loss is <= target (None if never)."""
    return next((step for step, v in smoothed_curve(curve, k) if v <= target), None)


def summarize(curve, val_loss, spikes, stopped, margin):
    losses = [c[1] for c in curve]
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    norms = [c[2] for c in curve if c[2] is not None and math.isfinite(c[2])]
    smooth = _smoothed(finite) if finite else []
    nonfinite = len(losses) - len(finite)
    diverged = bool(stopped) or not finite or (smooth[-1] > min(smooth) + margin)
    return dict(steps=len(curve), diverged=diverged, nonfinite_steps=nonfinite,
                final_train_loss=smooth[-1] if smooth else None,
                val_loss=val_loss if val_loss is not None and math.isfinite(val_loss) and not stopped else None,
                max_grad_norm=max(norms) if norms else None,
                loss_spikes=sum(e.get("metric") == "loss" for e in spikes),
                grad_spikes=sum(e.get("metric") == "grad_norm" for e in spikes),
                first_spike=min((e["iteration"] for e in spikes), default=None), stopped=stopped)


def read_spikes(run_dir):
    path = os.path.join(run_dir, "monitor.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [e for line in f if line.strip() for e in json.loads(line).get("spikes", [])]


def _init_worker():
    import torch
    torch.set_num_threads(1)


def train_one(job):
    """One training run in this worker process; returns its result dict (also written to disk)."""
    from megatron_patch.training.pretrain import run

    name, argv, run_dir, margin = job
    shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted attempt left (its monitor.jsonl)
    os.makedirs(run_dir)
    rec, stopped, t0 = Recorder(), None, time.time()
    with open(os.path.join(run_dir, "train.log"), "w", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            run(argv, callbacks=[rec])
        except Diverged as exc:
            stopped = str(exc)
    result = dict(name=name, seconds=round(time.time() - t0, 1), argv=argv,
                  **summarize(rec.curve, rec.val_loss, read_spikes(run_dir), stopped, margin))
    result["curve"] = [[i, _round(loss), _round(g)] for i, loss, g in rec.curve]
    tmp = os.path.join(run_dir, "result.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(run_dir, "result.json"))
    return result


def _round(x):
    return None if x is None or not math.isfinite(x) else round(x, 5)


def run_sweep(args):
    jobs, results = [], {}
    # Highest lr first: those are the informative runs if the sweep is cut short.
    for lr in sorted(args.lrs, reverse=True):
        for seed in args.seeds:
            for method in args.methods:
                name = run_name(method, lr, seed)
                run_dir = os.path.join(args.out, "runs", name)
                add_run(results, jobs, name, run_dir, lambda: training_argv(args, method, lr, seed, run_dir),
                        args.diverge_margin)
    print(f"{len(results)} runs already done, {len(jobs)} to train ({args.jobs} at a time)", flush=True)
    train_pending(jobs, args.jobs, results)
    return results


def add_run(results, jobs, name, run_dir, make_argv, margin, train=True):
    """A finished run's result into `results`; else, if `train`, a job for `train_pending`."""
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            results[name] = json.load(f)
    elif train:
        jobs.append((name, make_argv(), run_dir, margin))


def train_all(results, jobs, n_jobs) -> float:
    """Say what is done and what is left, train what is left; returns the wall seconds taken."""
    print(f"{len(results)} runs done, {len(jobs)} to train ({n_jobs} at a time)", flush=True)
    t0 = time.time()
    if jobs:
        train_pending(jobs, n_jobs, results)
    return time.time() - t0


def train_pending(jobs, n_jobs, results):
    """Train `jobs` ((name, argv, run_dir, margin) tuples) on `n_jobs` single-threaded worker
    processes, in order; each result goes into `results[name]` (and its run_dir) as it finishes."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        for r in pool.map(train_one, jobs):
            results[r["name"]] = r
            print(f"  {r['name']:<34} val {_fmt(r['val_loss'])} spikes {r['loss_spikes']}/{r['grad_spikes']}"
                  f" max|g| {_fmt(r['max_grad_norm'])} diverged {r['diverged']} ({r['seconds']:.0f} s,"
                  f" {time.time() - t0:.0f} s elapsed)", flush=True)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def aggregate(args, results):
    """{(method, lr): cell} over seeds."""
    cells = {}
    for method in args.methods:
        for lr in args.lrs:
            runs = [results[run_name(method, lr, s)] for s in args.seeds if run_name(method, lr, s) in results]
            if not runs:
                continue
            vals = [r["val_loss"] for r in runs if r["val_loss"] is not None and not r["diverged"]]
            cells[method, lr] = dict(
                seeds=len(runs), diverged=sum(r["diverged"] for r in runs),
                spiked=sum((r["loss_spikes"] + r["grad_spikes"]) > 0 for r in runs),
                loss_spikes=sum(r["loss_spikes"] for r in runs), grad_spikes=sum(r["grad_spikes"] for r in runs),
                max_grad_norm=max((r["max_grad_norm"] or 0) for r in runs),
                val_mean=statistics.fmean(vals) if vals else None,
                val_sd=statistics.stdev(vals) if len(vals) > 1 else None, val_n=len(vals),
                seconds=sum(r["seconds"] for r in runs))
    return cells


def pivot(args, cells, title, fmt):
    """Markdown rows: one per method, one column per lr."""
    lrs = sorted(args.lrs)
    rows = [f"| {title} | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for method in args.methods:
        rows.append(f"| {method} | " + " | ".join(fmt(cells[method, lr]) if (method, lr) in cells else " "
                                                 for lr in lrs) + " |")
    return rows


def write_table(args, cells, path, wall_s):
    lines = [f"Spike sweep: {args.num_layers} layers, d {args.hidden_size}, seq {args.seq_length}, "
             f"batch {args.micro_batch_size}, {args.iters} steps (warm-up {args.warmup}), init std "
             f"{'sqrt(2/(5d)) (small init)' if args.init_std is None else args.init_std}, "
             f"AdamW beta2 {args.adam_beta2}, clip {args.clip_grad}, seeds "
             f"{','.join(map(str, args.seeds))}. Spikes: monitor z > {args.spike_zscore:g} over "
             f"{args.spike_window} steps (loss / grad norm, summed over seeds). Val loss: mean ± sd over "
             f"non-diverged seeds.", "",
             "| method | lr | diverged | seeds with spikes | loss / grad spikes | max grad norm | val loss |",
             "|---|---|---|---|---|---|---|"]
    for (method, lr), c in cells.items():
        val = "-" if c["val_mean"] is None else f"{c['val_mean']:.3f}" + (
            f" ± {c['val_sd']:.3f}" if c["val_sd"] is not None else "") + (
            f" (n={c['val_n']})" if c["val_n"] != c["seeds"] else "")
        lines.append(f"| {method} | {lr:g} | {c['diverged']}/{c['seeds']} | {c['spiked']}/{c['seeds']} | "
                     f"{c['loss_spikes']} / {c['grad_spikes']} | {c['max_grad_norm']:.2f} | {val} |")
    lines += ["", *pivot(args, cells, "validation loss (mean ± sd over seeds; † = a seed diverged)",
                         lambda c: "-" if c["val_mean"] is None else f"{c['val_mean']:.3f}"
                         + (f" ± {c['val_sd']:.3f}" if c["val_sd"] is not None else "")
                         + (" †" if c["diverged"] else "")),
              "", *pivot(args, cells, "largest gradient norm (before clipping) over all seeds; spikes flagged",
                         lambda c: f"{c['max_grad_norm']:.1f}; {c['loss_spikes'] + c['grad_spikes']}")]
    best = {}
    for (method, lr), c in cells.items():
        if c["val_mean"] is not None and not c["diverged"] and (
                method not in best or c["val_mean"] < best[method][1]):
            best[method] = (lr, c["val_mean"])
    lines += ["", "| method | best lr (no seed diverged) | val loss there | highest lr with no divergence |",
              "|---|---|---|---|"]
    for method in args.methods:
        stable = [lr for (m, lr), c in cells.items() if m == method and not c["diverged"]]
        b = best.get(method)
        lines.append(f"| {method} | {b[0]:g} | {b[1]:.3f} | {max(stable):g} |" if b else
                     f"| {method} | - | - | {max(stable) if stable else '-'} |")
    run_s = sum(c["seconds"] for c in cells.values())
    lines += ["", f"Training time: {run_s / 60:.0f} min summed over the runs ({run_s / 60 / args.jobs:.0f} min "
                  f"with {args.jobs} in parallel); this invocation: {wall_s / 60:.1f} min wall."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot(args, results, cells, out):
    plt = pyplot()

    fig, axes = plt.subplots(2, (len(args.methods) + 1) // 2, figsize=(5 * ((len(args.methods) + 1) // 2), 8),
                             sharey=True, squeeze=False)
    for ax, method in zip(axes.flat, args.methods):
        stable = [lr for (m, lr), c in cells.items() if m == method and not c["diverged"]]
        lr = max(stable) if stable else max(args.lrs)
        for seed in args.seeds:
            r = results.get(run_name(method, lr, seed))
            if r is None:
                continue
            its = [c[0] for c in r["curve"]]
            ax.plot(its, [c[1] if c[1] is not None else float("nan") for c in r["curve"]],
                    lw=0.7, label=f"seed {seed}")
        ax.set_title(f"{method}, lr {lr:g}" + ("" if stable else " (all lrs diverged)"))
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel("training loss")
    save_figure(fig, os.path.join(out, "loss_curves.png"), dpi=110)

    lrs = sorted(args.lrs)
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.5 * len(lrs), 4), sharey=True, squeeze=False)
    for ax, lr in zip(axes.flat, lrs):
        for method in args.methods:
            curves = [results[n]["curve"] for n in (run_name(method, lr, s) for s in args.seeds) if n in results]
            if curves:
                steps = min(len(c) for c in curves)
                mean = [statistics.fmean(c[i][1] if c[i][1] is not None else float("nan") for c in curves)
                        for i in range(steps)]
                ax.plot(range(1, steps + 1), _smoothed(mean, 10), lw=1, label=method)
        ax.set_title(f"lr {lr:g} (mean over seeds, 10-step average)")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("training loss")
    axes.flat[0].legend(fontsize=8)
    save_figure(fig, os.path.join(out, "loss_by_lr.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in args.methods:
        pts = [(lr, c["val_mean"]) for (m, lr), c in sorted(cells.items()) if m == method and c["val_mean"] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        div = [lr for (m, lr), c in cells.items() if m == method and c["diverged"]]
        for lr in div:
            ax.axvline(lr, color="gray", lw=0.3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation loss (mean over non-diverged seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out, "val_loss_vs_lr.png"), dpi=110)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    results = run_sweep(args)
    wall = time.time() - t0
    cells = aggregate(args, results)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": {k: v for k, v in vars(args).items()}, "runs": results}, f)
    print(write_table(args, cells, os.path.join(args.out, "table.md"), wall))
    if not args.no_plots:
        plot(args, results, cells, args.out)
        print(f"plots: {args.out}/loss_curves.png, loss_by_lr.png, val_loss_vs_lr.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
