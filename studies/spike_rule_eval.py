"""Choose the spike detector's defaults with evidence: replay megatron_patch's SpikeDetector over the
per-step curves of a spike sweep (studies/spike_sweep.py's results.json) for a grid of windows
and z thresholds, and count what each rule catches and what it flags wrongly.

    python -m studies.spike_rule_eval [--results results/spike_sweep/results.json]

Reference events ("bursts"), defined independently of the rules under test: a step whose
gradient norm exceeds BURST_FACTOR x the median of the BURST_CONTEXT steps before it (after
the first 10 steps, whose norms fall by orders of magnitude). The sweep's Vanilla bursts after
warm-up are 21-35x their running mean. For each rule (window W, threshold Z on both the loss
and the grad norm, as the trainer runs it):
  recall          bursts flagged at their step, over all bursts of all runs;
  false / 1k      flags on steps that are not bursts, per 1000 steps, on the runs of the fixes
                  (Scaled Embed, Embed LN), which the paper says should not spike, and on all runs.
A false positive under --spike-policy skip costs one skipped update; a missed burst costs an
applied one (clipped by --clip-grad, but Adam's moments keep it).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from megatron_patch.monitor.spike_detector import SpikeDetector

BURST_FACTOR, BURST_CONTEXT, FIRST_STEP = 10.0, 32, 10
FIXES = ("scaled_embed", "embed_layernorm")
WINDOWS, ZSCORES = (32, 64, 128), (4.0, 6.0, 8.0)


def bursts(curve):
    """Iterations whose grad norm exceeds BURST_FACTOR x the median of the steps before."""
    found, norms = set(), []
    for iteration, _, grad_norm in curve:
        if iteration > FIRST_STEP and len(norms) >= 8:
            if grad_norm > BURST_FACTOR * statistics.median(norms[-BURST_CONTEXT:]):
                found.add(iteration)
        norms.append(grad_norm)
    return found


def flags(curve, window, z, min_history=16):
    detector = SpikeDetector(window=window, min_history=min(min_history, window), z_threshold=z)
    return {it for it, loss, grad in curve if detector.observe(it, loss=loss, grad_norm=grad)}


def evaluate(runs):
    rows = []
    for window in WINDOWS:
        for z in ZSCORES:
            hit = total = false_fix = steps_fix = false_all = steps_all = 0
            for name, run in runs.items():
                curve = json.loads(run["curve"]) if isinstance(run["curve"], str) else run["curve"]
                truth, flagged = bursts(curve), flags(curve, window, z)
                hit, total = hit + len(truth & flagged), total + len(truth)
                wrong = len(flagged - truth)
                false_all, steps_all = false_all + wrong, steps_all + len(curve)
                if name.startswith(FIXES):
                    false_fix, steps_fix = false_fix + wrong, steps_fix + len(curve)
            rows.append(dict(window=window, z=z, bursts=total, caught=hit,
                             recall=hit / total if total else float("nan"),
                             false_per_1k_fixes=1000 * false_fix / max(steps_fix, 1),
                             false_per_1k_all=1000 * false_all / max(steps_all, 1)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results/spike_sweep/results.json")
    args = ap.parse_args(argv)
    runs = json.loads(Path(args.results).read_text())["runs"]
    per_method = {}
    for name, run in runs.items():
        curve = json.loads(run["curve"]) if isinstance(run["curve"], str) else run["curve"]
        per_method.setdefault(name.rsplit("_lr", 1)[0], []).append(len(bursts(curve)))
    print(f"{len(runs)} runs; bursts (grad norm > {BURST_FACTOR:g}x the median of the {BURST_CONTEXT} steps "
          f"before) per method: " + ", ".join(f"{m} {sum(b)}" for m, b in sorted(per_method.items())))
    print(f"{'window':>6} {'z':>4} {'caught':>8} {'recall':>7} {'false/1k (fixes)':>17} {'false/1k (all)':>15}")
    for r in evaluate(runs):
        print(f"{r['window']:>6} {r['z']:>4g} {r['caught']:>4}/{r['bursts']:<3} {r['recall']:>7.2f} "
              f"{r['false_per_1k_fixes']:>17.2f} {r['false_per_1k_all']:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
