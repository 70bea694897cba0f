"""Learning-rate sensitivity across widths: the small-scale proxy of Wortsman et al. (arXiv 2309.14322)
applied to the stabilizations of [SNM] and [WeSaR].

Over a log grid of peak learning rates, a method's *lr sensitivity* at one width is

    mean over the grid of  min(final loss(lr), loss at init) - min over the grid of final loss(lr)

(Wortsman et al. §3.2; "final loss" = validation loss at the end, "loss at init" = the run's
first-step loss, so a run that blew up counts as no progress at all). [SNM]'s mechanism predicts
that Vanilla's sensitivity rises with width d (the shallow LNs' gradient gain is ~1/sigma_x and
sigma = sqrt(2/(5d)) shrinks with d, [SNM v2] Eq. 9-10, v4 Eq. 12-14 [unverified]) while Scaled
Embed's and Embed LN's stay
flat. The figure is computed per seed (the same seed at every lr), then reported as mean ± sd,
with its slope against log2(d).

Every run is a real `pretrain_gpt.py` training from `studies/spike_sweep.py` (same recipe:
8 layers, seq 128, batch 8, AdamW, cosine schedule, monitor in log mode), with head dim 32 at
every width. Runs go to OUT/runs/<name>/; finished ones are not re-run, so an interrupted study
resumes (each run's result.json, curve included, is committed, so a later session on another
machine continues the grid). Runs of earlier sweeps are not imported even when their flags
match: the same flags on another machine agreed to the last digit for 18 steps, then drifted
apart by float rounding to 0.08 nats of final loss at lr 1e-2 — as large as a change of seed.
A run is one sample of that noise; the seed spread reported covers it.

    python -m studies.lr_study --out results/lr_study --jobs 2
    python -m studies.lr_study --smoke --out /tmp/lr_study      # seconds (CI)
"""

import argparse
import json
import math
import os
import sys

from studies import lr_study_report as report
from studies import spike_sweep as sweep
from studies.cli import comma_list, known_names
from studies.lr_sensitivity import methods_at, run_name, sensitivity

# label -> (spike_sweep method, extra settings). Every width gets lr_sensitivity.EVERY_WIDTH; the
# other methods run at --extra-methods-width only (the budget: they answer "how does X compare",
# not "how does it scale").
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
    args.widths = comma_list(args.widths, int)
    args.methods = known_names(p, args.methods, METHODS)
    args.lrs, args.seeds = comma_list(args.lrs, float), comma_list(args.seeds, int)
    if args.smoke:
        args.widths, args.lrs, args.seeds, args.extra_methods_width = [32, 64], [1e-3, 1e-2], [1], 64
    bad = [d for d in args.widths if d % args.head_dim]
    if bad:
        p.error(f"width(s) {bad} are not multiples of --head-dim {args.head_dim}")
    return args


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


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results, jobs = plan(args)
    wall = sweep.train_all(results, jobs, args.jobs)
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
