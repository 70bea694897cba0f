"""Does the norm of Adam's update spike before the gradient norm? The spike study's Vanilla cell
(the quickstart model: 8 layers, d 128, small init, lr 3e-3, seed 1), whose gradient norm bursts
right after warm-up, run with the monitor measuring every step, against Scaled Embed.

    python -m studies.update_norm_lead [--data data/quickstart] [--steps 60]

Needs the quickstart's data (bash examples/quickstart.sh, or its first three commands). Prints,
per run, the steps where each signal first exceeds FACTOR x its median over the previous steps
(total and per layer), and the per-layer update and gradient norms around the burst.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTOR, CONTEXT, FIRST_STEP = 3.0, 10, 12  # judged from step 12: the first steps' norms fall fast


def run(out: Path, data: str, steps: int, extra) -> list:
    argv = ["--num-layers", 8, "--hidden-size", 128, "--num-attention-heads", 4, "--seq-length", 128,
            "--max-position-embeddings", 128, "--micro-batch-size", 8, "--global-batch-size", 8,
            "--untie-embeddings-and-output-weights", "--small-init", "--lr", 3e-3, "--min-lr", 3e-4,
            "--lr-decay-style", "cosine", "--lr-warmup-iters", 20, "--train-iters", 300, "--exit-interval", steps,
            "--adam-beta1", 0.9, "--adam-beta2", 0.999, "--clip-grad", 1.0, "--weight-decay", 0.01,
            "--hidden-dropout", 0, "--attention-dropout", 0, "--data-path", f"{data}/wiki_text_document",
            "--split", "98,2,0", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            f"{data}/tok.model", "--log-interval", steps, "--eval-iters", 0, "--seed", 1,
            "--monitor-interval", 1, "--monitor-update-ratio", "--spike-policy", "log",
            "--spike-signal", "any", "--monitor-dir", out, *extra]
    shutil.rmtree(out, ignore_errors=True)  # monitor.jsonl is appended to
    subprocess.run([sys.executable, str(ROOT / "pretrain_gpt.py"), *map(str, argv)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    return [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]


def first_burst(values, start=FIRST_STEP):
    """1-based step where a value first exceeds FACTOR x the median of the CONTEXT before it."""
    for i in range(max(start, CONTEXT), len(values)):
        if values[i] > FACTOR * statistics.median(values[i - CONTEXT:i]):
            return i + 1
    return None


def jump(values, step):
    """values[step] / the median of the CONTEXT steps before it (1-based step)."""
    i = step - 1
    return values[i] / statistics.median(values[max(0, i - CONTEXT):i])


def series(lines, section, key):
    return [line[section][key] if section else line[key] for line in lines]


def report(name, lines):
    layers = sorted({k.split("/")[0] for k in lines[0]["grad_norm"] if k.startswith("layer")})
    grad_total, update_total = series(lines, None, "grad_norm_total"), series(lines, None, "update_norm_total")
    peak = grad_total.index(max(grad_total[FIRST_STEP:])) + 1
    print(f"== {name}: first step above {FACTOR:g}x the median of the {CONTEXT} steps before")
    print(f"   total: grad norm {first_burst(grad_total)}, update norm {first_burst(update_total)}; at the grad "
          f"norm's peak (step {peak}): grad x{jump(grad_total, peak):.1f}, update x{jump(update_total, peak):.2f} "
          f"their medians; update one step before: x{jump(update_total, peak - 1):.2f}")
    for layer in layers:
        grad = [sum(v ** 2 for k, v in rec["grad_norm"].items() if k.startswith(layer + "/")) ** 0.5 for rec in lines]
        upd = [sum(v ** 2 for k, v in rec["update_norm"].items() if k.startswith(layer + "/")) ** 0.5 for rec in lines]
        print(f"   {layer}: grad {first_burst(grad)}, update {first_burst(upd)}; "
              f"peak grad {max(grad):.3g} at {grad.index(max(grad)) + 1}, peak update {max(upd):.3g} at "
              f"{upd.index(max(upd)) + 1}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/quickstart")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/update_norm_lead")
    ap.add_argument("--analyse-only", action="store_true", help="Report on the monitor.jsonl of an earlier run.")
    args = ap.parse_args()
    for name, extra in (("vanilla", []), ("scaled_embed", ["--scaled-embed"])):
        out = Path(args.out) / name
        lines = ([json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]
                 if args.analyse_only else run(out, args.data, args.steps, extra))
        report(name, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
