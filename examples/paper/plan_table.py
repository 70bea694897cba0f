"""The dry-run table of the paper configurations (markdown), and the flag reader the tests share.

    python examples/paper/plan_table.py      # sizes x methods on the stated clusters below

Reads the same .args files as pretrain.sh (comments dropped, split on whitespace), plans each run
with megatron_patch.training.dry_run (layout chooser, exact parameter count, memory per GPU) and
prints one markdown row per size and method. Nothing is built; no GPU or data needed.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = ("350m", "1.7b", "13b")
METHODS = ("vanilla", "embed_detach", "embed_ln", "scaled_embed", "xavier_init", "sigma1_embed", "wesar")
# The cluster each size is planned for in docs/reproduce.md: (nodes, GPUs per node, GB per GPU).
CLUSTERS = {"350m": (1, 8, 80), "1.7b": (1, 8, 80), "13b": (4, 8, 80)}


def read_args(path: Path) -> list:
    words = []
    for line in path.read_text().splitlines():
        words += line.split("#", 1)[0].split()
    return words


def paper_argv(size: str, method: str, lr=None, precision: str = "fp16") -> list:
    """pretrain_gpt.py flags of one paper run, as pretrain.sh --dry-run assembles them (no layout)."""
    argv = read_args(HERE / "common.args") + read_args(HERE / "sizes" / f"{size}.args")
    argv += read_args(HERE / "methods" / f"{method}.args")
    argv += (["--lr", str(lr)] if lr is not None else []) + [f"--{precision}"]
    return argv + ["--mock-data", "--vocab-size", "50256"]  # GPT-2's 50257 ids


def plan_run(size: str, method: str, lr=None):
    """(validated args, plan dict) for the stated cluster of this size."""
    from megatron_patch.training import dry_run

    nodes, gpus, memory = CLUSTERS[size]
    argv = paper_argv(size, method, lr) + ["--gpu-memory-gb", str(memory)]
    _, args = dry_run.choose_layout(argv, nodes * gpus, gpus)
    return args, dry_run.plan(args)


def main() -> int:
    from megatron_patch.training import dry_run

    print("| size | method | parameters | GPUs | TP x PP x DP, micro-batch | memory per GPU (GB, est.) "
          f"| tokens/step | FLOPs/step | days at {dry_run.ASSUMED_MFU:.0%} MFU (H100) |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|")
    for size in SIZES:
        for method in METHODS:
            args, p = plan_run(size, method)
            days = dry_run.days_per_run(args, p["flops_per_step"])
            nodes, gpus, memory = CLUSTERS[size]
            print(f"| {size} | {method} | {p['parameters']:,} | {nodes}x{gpus} ({memory:g} GB) | "
                  f"{args.tensor_model_parallel_size} x {args.pipeline_model_parallel_size} x "
                  f"{args.data_parallel_size}, {args.micro_batch_size} | {p['memory'].total / 1e9:.1f} | "
                  f"{p['tokens_per_step']:,} | {p['flops_per_step']:.3g} | {days:.1f} |")
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    sys.exit(main())
