"""The GPU check (driven by tests/gpu/run.sh): the configuration users launch, run for real on one
CUDA GPU, in a few minutes, with a summary of the figures.

    python tests/gpu/check.py OUT_DIR [--quick]

Parts (each a subprocess of the real entry points, so a crash in one does not hide the others):
  gpu_tests     the gpu-marked pytest tests
  throughput    350M (24 x 1024, seq 2048) bf16 on Transformer Engine layers: tokens/s, TFLOP/s, MFU
  fp16_scaler   fp16 with dynamic loss scaling: the scale falls from 2^32 and settles, loss falls
  te_export     a TE-layer checkpoint evaluated (tools/evaluate.py) and exported to HF; the
                export's logits against megatron's
  step_time     WeSaR's and Embed LN's step time and peak memory against Vanilla's, all on
                Transformer Engine layers (same shape, interleaved)
Without CUDA every GPU part is skipped and the summary says so (exit 0): the CPU path is tested.
OUT_DIR gets summary.json, summary.txt and one log per part.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name substring, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
LOG_FIELDS = {"tokens_per_s": r"tokens per second: ([0-9.]+)", "tflops": r"TFLOP/s per device: ([0-9.e+-]+)",
              "mfu_percent": r"MFU: ([0-9.]+)%", "ms_per_iter": r"elapsed time per iteration \(ms\): ([0-9.]+)",
              "loss": r"lm loss: ([0-9.E+-]+)", "loss_scale": r"loss scale: ([0-9.]+)",
              "skipped": r"number of skipped iterations:\s+(\d+)", "memory_mib": r"memory \(MiB\): ([0-9.]+)"}
SHAPE_350M = ["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16",
              "--ffn-hidden-size", "4096", "--seq-length", "2048", "--max-position-embeddings", "2048"]
COMMON = ["--mock-data", "--vocab-size", "50257", "--tokenizer-type", "NullTokenizer", "--lr", "3e-4",
          "--lr-warmup-iters", "2", "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
          "--eval-iters", "0", "--seed", "1234", "--hidden-dropout", "0", "--attention-dropout", "0"]


def cuda_device():
    """(name, peak TFLOP/s) of GPU 0, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return name, peak


def run_logged(cmd, log: Path, timeout: int) -> subprocess.CompletedProcess:
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(map(str, cmd))}\n# exit {proc.returncode} after {time.time() - start:.0f} s\n"
                   + proc.stdout + proc.stderr)
    return proc


def last_log_line(stdout: str) -> dict:
    """The figures of the last Megatron-LM style iteration line."""
    lines = [line for line in stdout.splitlines() if " iteration " in line and "consumed samples" in line]
    if not lines:
        return {}
    found = {k: re.search(p, lines[-1]) for k, p in LOG_FIELDS.items()}
    return {k: float(m.group(1)) for k, m in found.items() if m}


def pretrain(out: Path, name: str, argv, timeout=300) -> dict:
    proc = run_logged([sys.executable, str(ROOT / "pretrain_gpt.py"), *map(str, argv)], out / f"{name}.log", timeout)
    result = {"ok": proc.returncode == 0, **last_log_line(proc.stdout)}
    if proc.returncode:
        result["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return result


# ---------------------------------------------------------------- parts
def gpu_tests(out: Path, quick: bool) -> dict:
    proc = run_logged([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider"],
                      out / "gpu_tests.log", 300)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    return {"ok": proc.returncode in (0, 5), "summary": summary, **counts}


def throughput(out: Path, quick: bool, peak) -> dict:
    iters = 10 if quick else 30
    argv = SHAPE_350M + COMMON + ["--bf16", "--transformer-impl", "transformer_engine", "--micro-batch-size", "4",
                                  "--global-batch-size", "16", "--train-iters", iters, "--log-interval", iters // 2]
    if peak:
        argv += ["--peak-tflops", peak]
    return pretrain(out, "throughput", argv, timeout=420)


def fp16_scaler(out: Path, quick: bool) -> dict:
    iters = 60
    argv = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8", "--seq-length", "512",
            "--max-position-embeddings", "512", "--micro-batch-size", "8", "--train-iters", iters,
            "--log-interval", "1", "--fp16", *COMMON]
    proc = run_logged([sys.executable, str(ROOT / "pretrain_gpt.py"), *map(str, argv)], out / "fp16_scaler.log", 300)
    lines = [last_log_line(line) for line in proc.stdout.splitlines()]
    lines = [line for line in lines if line]
    scales = [line.get("loss_scale") for line in lines]
    losses = [line["loss"] for line in lines if "loss" in line]
    return {"ok": proc.returncode == 0 and bool(losses), "first_scale": scales[0] if scales else None,
            "final_scale": scales[-1] if scales else None,
            "skipped_steps": sum(int(line.get("skipped", 0)) for line in lines),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}


def te_export(out: Path, quick: bool) -> dict:
    """Train a small TE model, evaluate its checkpoint, export it, and compare the logits."""
    from tests.train_helpers import make_corpus

    corpus = make_corpus(out / "data" / "tiny_text_document")
    ckpt = out / "te_ckpt"
    argv = ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
            "--max-position-embeddings", "128", "--micro-batch-size", "8", "--train-iters", "20",
            "--log-interval", "10", "--bf16", "--transformer-impl", "transformer_engine",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "200", "--data-path", corpus, "--split", "90,5,5",
            "--lr", "1e-3", "--eval-iters", "0", "--save", ckpt, "--save-interval", "20"]
    trained = pretrain(out, "te_train", argv)
    if not trained["ok"]:
        return {"ok": False, "stage": "train", **trained}
    evaluate = run_logged([sys.executable, str(ROOT / "tools/evaluate.py"), "--load", ckpt, "--data-path", corpus,
                           "--output-json", out / "te_eval.json"], out / "te_eval.log", 300)
    hf_dir = out / "te_hf"
    export = run_logged([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "--to", "hf",
                         "--load", ckpt, "--output", hf_dir], out / "te_export.log", 300)
    result = {"ok": evaluate.returncode == 0 and export.returncode == 0}
    if evaluate.returncode == 0:
        result["eval_mean_nll"] = json.loads((out / "te_eval.json").read_text()).get("mean_nll")
    if export.returncode == 0:
        result["max_abs_logit_diff"] = _export_logit_diff(ckpt, hf_dir)
        result["ok"] = result["ok"] and result["max_abs_logit_diff"] < 1e-3
    return result


def _export_logit_diff(ckpt: Path, hf_dir: Path) -> float:
    import torch
    from transformers import GPT2LMHeadModel

    from megatron_patch.export import megatron_io

    tokens = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    with megatron_io.loaded_checkpoint(str(ckpt)) as (model, _, _):
        ours = megatron_io.megatron_logits(model, tokens)
    hf = GPT2LMHeadModel.from_pretrained(str(hf_dir), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    return float((ours - theirs).abs().max())


def step_time(out: Path, quick: bool) -> dict:
    """Median ms/iteration and peak memory of each method, runs interleaved over rounds so drift
    hits all alike."""
    shape = ["--num-layers", "12", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "1024",
             "--max-position-embeddings", "1024", "--micro-batch-size", "8", "--train-iters", "20",
             "--log-interval", "10", "--bf16", *COMMON]
    methods = {"vanilla_te": ["--transformer-impl", "transformer_engine"],
               "embed_ln_te": ["--transformer-impl", "transformer_engine", "--embed-layernorm"],
               "wesar_te": ["--transformer-impl", "transformer_engine", "--wesar"]}
    times, memory = {m: [] for m in methods}, {}
    for r in range(1 if quick else 2):
        for name, extra in methods.items():
            result = pretrain(out, f"step_time_{name}_{r}", shape + extra)
            if result.get("ms_per_iter"):
                times[name].append(result["ms_per_iter"])
            if result.get("memory_mib"):
                memory[name] = max(memory.get(name, 0.0), result["memory_mib"])
    med = {m: sorted(t)[len(t) // 2] for m, t in times.items() if t}
    ratios = {}
    if "vanilla_te" in med:
        for name in ("embed_ln_te", "wesar_te"):
            ratios[f"{name} / vanilla_te"] = med.get(name, float("nan")) / med["vanilla_te"]
    if "vanilla_te" in memory and "wesar_te" in memory:
        ratios["memory wesar_te / vanilla_te"] = memory["wesar_te"] / memory["vanilla_te"]
    return {"ok": len(med) == len(methods), "ms_per_iter": med, "memory_mib": memory, "ratios": ratios}


PARTS = ("gpu_tests", "throughput", "fp16_scaler", "te_export", "step_time")


def summary_lines(summary: dict) -> list:
    lines = [f"GPU check: {summary['device']}"]
    for part in PARTS:
        result = summary["parts"][part]
        if result.get("skipped"):
            lines.append(f"  {part:12s} skipped: {result['skipped']}")
            continue
        figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in result.items() if k != "ok")
        lines.append(f"  {part:12s} {'ok  ' if result['ok'] else 'FAIL'} {figures}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true", help="Fewer iterations and one timing round.")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = cuda_device()
    summary = {"device": device[0] if device else "no CUDA GPU", "cuda": device is not None, "parts": {}}
    for part in PARTS:
        if device is None:
            summary["parts"][part] = {"ok": True, "skipped": "no CUDA GPU on this machine"}
            continue
        start = time.time()
        try:
            extra = (device[1],) if part == "throughput" else ()
            result = globals()[part](args.out, args.quick, *extra)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not hide the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        result["seconds"] = round(time.time() - start, 1)
        summary["parts"][part] = result
    lines = summary_lines(summary)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if all(r["ok"] for r in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
