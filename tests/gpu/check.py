"""The GPU check: the configuration users launch, run for real on one CUDA GPU (H100/H200) in under
8 minutes, ending with a summary of the figures. Made to run on the GPU machine lent for checks,
which has no megatron-core and no network: tests/gpu/prepare_carry.py prepares the wheels and
prints the command (docs/gpu_check.md).

    python tests/gpu/check.py OUT_DIR [--quick] [--cpu-rehearsal]

Parts, in order (each in subprocesses of the real entry points, so a crash in one does not hide
the others; every part is stopped at --budget-s, 450 s on a GPU, and one that would start after
it is not run, and says so):
  throughput    the 350M paper config (examples/paper: 24 x 1024, seq 2048) in bf16: tokens/s,
                TFLOP/s, MFU against the card's dense bf16 peak, peak memory
  fp16_scaler   fp16 with dynamic loss scaling: the scale falls from 2^32 and settles, loss falls
  step_time     Scaled Embed, Embed LN and WeSaR against Vanilla, one process, runs interleaved
                over rounds: median ms/iteration and peak memory, ratios to Vanilla
  export        a short run's checkpoint evaluated (tools/evaluate.py) and exported to HF
                (tools/convert_checkpoint.py); the export's logits against megatron's, on the GPU
  gpu_tests     the gpu-marked pytest tests (tests/gpu)
Layers: Transformer Engine's where it is installed, else megatron-core's local ones
(capabilities.default_transformer_impl); what could not run (TE, apex's kernels, several GPUs)
is listed under "not run" with the reason.

OUT_DIR gets summary.json, summary.txt and logs.tar.gz (every part's logs); checkpoints and data
go to a scratch folder (--work). Exit status: 0 every part passed on a GPU; 1 a part failed;
2 the environment is broken (a package does not import); 3 no CUDA device (nothing measured).
--cpu-rehearsal (or GPU_CHECK_CPU_REHEARSAL=1) runs every part anyway, on the CPU at tiny shapes,
so the packaging and the local-layer paths are exercised without a GPU (CI's rehearsal); its
exit status is still 3 when all parts pass, since no GPU figure was measured.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

# megatron-core's import-time notices that apex/Transformer Engine are absent (see pretrain_gpt.py):
# the summary says so once, under "not run".
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")

ROOT = Path(__file__).resolve().parents[2]
# Run as a script on the lent GPU machine, where megatron_patch is not installed: the repository
# root must be importable (its subprocesses get it on PYTHONPATH, see Runner).
sys.path.insert(0, str(ROOT))

EXIT_OK, EXIT_FAILED, EXIT_BROKEN, EXIT_NO_CUDA = 0, 1, 2, 3
PARTS = ("throughput", "fp16_scaler", "step_time", "export", "gpu_tests")
# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, for MFU. The H200 is the H100's
# chip (GH100) with more and faster memory: the same 989 TFLOP/s (SXM).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
LOG_FIELDS = {"tokens_per_s": r"tokens per second: ([0-9.]+)", "tflops": r"TFLOP/s per device: ([0-9.e+-]+)",
              "mfu_percent": r"MFU: ([0-9.]+)%", "ms_per_iter": r"elapsed time per iteration \(ms\): ([0-9.]+)",
              "loss": r"lm loss: ([0-9.E+-]+)", "loss_scale": r"loss scale: ([0-9.]+)",
              "skipped": r"number of skipped iterations:\s+(\d+)", "memory_mib": r"memory \(MiB\): ([0-9.]+)"}
PAPER = ROOT / "examples" / "paper"
# Training flags every part shares: random tokens, no evaluation, a short warm-up.
COMMON = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--eval-iters", "0", "--seed", "1234",
          "--lr-warmup-iters", "2"]
# Outside the paper config: no dropout, so timings and the scaler's path depend on no masks.
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]


class Shapes:
    """Model and run sizes: the GPU's (the real figures) or the CPU rehearsal's (tiny, same flags)."""

    def __init__(self, on_gpu: bool, quick: bool):
        self.on_gpu = on_gpu
        if on_gpu:
            self.throughput = []  # the paper's 350M shape as it stands
            self.throughput_batch = (4, 16)  # micro, global (4 accumulation steps of 4 x 2048 tokens)
            self.throughput_iters = 10 if quick else 30
            self.vocab = 50256  # GPT-2's, as examples/paper/pretrain.sh's mock data
            self.small = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8",
                          "--seq-length", "512", "--max-position-embeddings", "512", "--micro-batch-size", "8"]
            self.step = ["--num-layers", "12", "--hidden-size", "1024", "--num-attention-heads", "16",
                         "--seq-length", "1024", "--max-position-embeddings", "1024", "--micro-batch-size", "8"]
            self.step_iters, self.rounds = 20, 1 if quick else 2
            self.export = ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
                           "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "8"]
        else:
            tiny = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                    "--ffn-hidden-size", "256", "--seq-length", "32", "--max-position-embeddings", "32"]
            self.throughput = tiny
            self.throughput_batch = (2, 4)
            self.throughput_iters = 4
            self.vocab = 256
            self.small = tiny + ["--micro-batch-size", "4"]
            self.step = tiny + ["--micro-batch-size", "4"]
            self.step_iters, self.rounds = 4, 1
            self.export = tiny + ["--micro-batch-size", "4"]
        self.fp16_iters = 80  # the scale needs ~15-25 steps to fall from 2^32 to its working range


# ---------------------------------------------------------------- environment
def environment() -> dict:
    """Versions and origins of what the check imports; raises ImportError naming the package."""
    found = {"python": sys.version.split()[0]}
    for module in ("torch", "megatron.core", "transformers", "pytest", "numpy"):
        mod = __import__(module, fromlist=["_"])
        found[module] = getattr(mod, "__version__", "?")
        if module == "megatron.core":
            found["megatron.core from"] = str(Path(mod.__file__).parent.parent.parent)
    import megatron_patch  # noqa: F401  (the package itself, from this work tree)

    return found


def device(caps) -> dict:
    """The CUDA device 0 and its dense bf16 peak, or None without CUDA."""
    import torch

    if not caps.cuda:
        return None
    name = torch.cuda.get_device_name(0)
    props = torch.cuda.get_device_properties(0)
    return {"name": name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"sm_{props.major}{props.minor}",
            "peak_bf16_tflops": next((v for k, v in PEAK_TFLOPS.items() if k in name), None)}


def not_run(caps, dev) -> dict:
    """What this check cannot measure on this machine, each with the reason."""
    skipped = {}
    if not caps.transformer_engine:
        skipped["Transformer Engine layers (fused attention, TE linears; the TE tests in tests/gpu)"] = (
            "Transformer Engine is not installed (on the lent machine it cannot be: its wheel is 276 MB and "
            "transformer-engine-torch is a source distribution only); the parts run on megatron-core's "
            "local layers")
    if not caps.apex:
        skipped["apex kernels (FusedLayerNorm, persistent layer norm)"] = "apex is not installed"
    if not caps.fused_wgrad:
        skipped["gradient-accumulation fusion of local linears"] = (
            "needs apex's fused_weight_gradient_mlp_cuda, not installed")
    if not caps.masked_softmax:
        skipped["megatron's fused masked softmax"] = (
            "scaled_masked_softmax_cuda is not built (the megatron-core wheel ships no kernels)")
    count = dev["count"] if dev else 0
    if count < 2:
        skipped["tensor/pipeline/data parallelism across GPUs (NCCL between devices)"] = (
            f"{count} CUDA device(s) here; the parallel layouts are tested on CPU (gloo) only")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        skipped["DeepSpeed engine"] = "DeepSpeed is not installed"
    return skipped


# ---------------------------------------------------------------- running
class Runner:
    """Runs the parts' commands with logs in WORK/logs and a shared deadline."""

    def __init__(self, work: Path, budget_s: float, timeout_scale: float = 1.0):
        self.work, self.logs = work, work / "logs"
        self.timeout_scale = timeout_scale  # the CPU rehearsal's: a shared CPU may be slow
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.time() + budget_s
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, cmd, name: str, timeout: float) -> subprocess.CompletedProcess:
        """`cmd` in the repository root; its output in logs/NAME.log, also when it times out."""
        timeout = max(1.0, min(timeout * self.timeout_scale, self.left()))
        start = time.time()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            code = 124
            err += f"\ntimed out after {timeout:.0f} s\n"
        (self.logs / f"{name}.log").write_text(
            f"$ {' '.join(map(str, cmd))}\n# exit {code} after {time.time() - start:.0f} s\n" + out + err)
        return subprocess.CompletedProcess(cmd, code, out, err)

    def pretrain(self, argv, name: str, timeout: float) -> dict:
        proc = self.run([sys.executable, ROOT / "pretrain_gpt.py", *argv], name, timeout)
        result = {"ok": proc.returncode == 0, **last_log_line(proc.stdout)}
        if proc.returncode:
            result["error"] = last_error(proc)
        return result


def last_error(proc) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).strip().splitlines() if line.strip()]
    return (lines or ["(no output)"])[-1][:300]


def last_log_line(stdout: str) -> dict:
    """The figures of the last Megatron-LM style iteration line."""
    lines = [line for line in stdout.splitlines() if " iteration " in line and "consumed samples" in line]
    if not lines:
        return {}
    found = {k: re.search(p, lines[-1]) for k, p in LOG_FIELDS.items()}
    return {k: float(m.group(1)) for k, m in found.items() if m}


def _args_file(path: Path) -> list:
    """Flags of an examples/paper .args file: '#' starts a comment, words split on whitespace."""
    return [word for line in path.read_text().splitlines() for word in line.split("#")[0].split()]


def paper_flags(size: str = "350m", method: str = "vanilla") -> list:
    """The paper run's flags as examples/paper/pretrain.sh reads them (common -> size -> method)."""
    return (_args_file(PAPER / "common.args") + _args_file(PAPER / "sizes" / f"{size}.args")
            + _method_flags(method))


def _method_flags(method: str) -> list:
    return _args_file(PAPER / "methods" / f"{method}.args")


# ---------------------------------------------------------------- parts
def throughput(run: Runner, shapes: Shapes, impl: str, dev) -> dict:
    """The 350M paper config in bf16 on random tokens. The paper's flags, then the check's: the
    layers, a short run, and no distributed optimizer state sharding to speak of at DP = 1."""
    iters = shapes.throughput_iters
    micro, global_batch = shapes.throughput_batch
    base = paper_flags() + COMMON + shapes.throughput + [
        "--bf16", "--transformer-impl", impl, "--vocab-size", shapes.vocab, "--train-iters", iters,
        "--log-interval", iters // 2, "--global-batch-size", global_batch]
    if dev and dev["peak_bf16_tflops"]:
        base += ["--peak-tflops", dev["peak_bf16_tflops"]]
    while True:  # halve the micro-batch on an out-of-memory error (figures say which ran)
        result = run.pretrain(base + ["--micro-batch-size", micro], f"throughput_mbs{micro}", 240)
        if result["ok"] or "out of memory" not in result.get("error", "").lower() or micro == 1:
            break
        micro //= 2
    params = re.findall(r"([0-9,]+) parameters on rank 0", (run.logs / f"throughput_mbs{micro}.log").read_text())
    return {**result, "micro_batch": micro, "global_batch": global_batch, "iterations": iters,
            "figures_over_last_iterations": iters - iters // 2,
            **({"parameters": int(params[-1].replace(",", ""))} if params else {})}


def fp16_scaler(run: Runner, shapes: Shapes, impl: str, dev) -> dict:
    """fp16 with dynamic loss scaling: the scale starts at 2^32 and every overflowed step is skipped
    and halves it, until a step applies (the descent); after it the scale settles: it overflows
    now and then (at most 10% of the remaining steps are skipped) and the loss falls."""
    iters = shapes.fp16_iters
    argv = COMMON + NO_DROPOUT + shapes.small + ["--fp16", "--transformer-impl", impl, "--vocab-size", shapes.vocab,
                                    "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
                                    "--clip-grad", "1.0", "--train-iters", iters, "--log-interval", "1"]
    proc = run.run([sys.executable, ROOT / "pretrain_gpt.py", *argv], "fp16_scaler", 180)
    lines = [f for f in (last_log_line(line) for line in proc.stdout.splitlines()) if f]
    scales = [f.get("loss_scale") for f in lines]
    skipped = [int(f.get("skipped", 0)) for f in lines]
    losses = [f["loss"] for f in lines if "loss" in f]
    descent = next((i for i, s in enumerate(skipped) if not s), len(skipped))  # steps until one applies
    after = skipped[descent:]
    settled = bool(after) and sum(after) <= 0.1 * len(after) and scales[-1] < 2.0 ** 32
    result = {"ok": proc.returncode == 0 and settled and bool(losses) and losses[-1] < losses[0],
              "first_scale": scales[0] if scales else None, "final_scale": scales[-1] if scales else None,
              "descent_steps": descent, "skipped_after_descent": sum(after), "iterations": len(lines),
              "settled": settled, "first_loss": losses[0] if losses else None,
              "final_loss": losses[-1] if losses else None}
    if proc.returncode:
        result["error"] = last_error(proc)
    return result


# The compared methods, with the flags of their paper runs (examples/paper/methods/NAME.args).
METHODS = ("vanilla", "scaled_embed", "embed_ln", "wesar")


def step_time(run: Runner, shapes: Shapes, impl: str, dev) -> dict:
    """Each method's median ms/iteration (second half of each run) and peak memory, from one
    process that trains them in turn, interleaved over rounds so drift hits all alike
    (tests/gpu/step_time.py)."""
    iters = shapes.step_iters
    base = COMMON + NO_DROPOUT + shapes.step + ["--bf16", "--transformer-impl", impl, "--vocab-size", shapes.vocab,
                                                "--lr", "3e-4", "--train-iters", iters, "--log-interval", iters // 2]
    spec = run.work / "step_time_spec.json"
    methods = {m: _method_flags(m) for m in METHODS}
    spec.write_text(json.dumps({"base": [str(a) for a in base], "methods": methods, "rounds": shapes.rounds}))
    out = run.work / "step_time.json"
    proc = run.run([sys.executable, ROOT / "tests" / "gpu" / "step_time.py", spec, out], "step_time", 240)
    if proc.returncode or not out.exists():
        return {"ok": False, "error": last_error(proc)}
    runs = json.loads(out.read_text())
    med, memory = {}, {}
    for name in METHODS:
        times = sorted(r["ms_per_iter"] for r in runs if r["method"] == name and r.get("ms_per_iter"))
        if times:
            med[name] = times[len(times) // 2]
        mems = [r["memory_mib"] for r in runs if r["method"] == name and r.get("memory_mib")]
        if mems:
            memory[name] = max(mems)
    ratios = {f"{m} / vanilla": round(med[m] / med["vanilla"], 4) for m in med if m != "vanilla" and "vanilla" in med}
    mem_ratios = {f"{m} / vanilla": round(memory[m] / memory["vanilla"], 4)
                  for m in memory if m != "vanilla" and "vanilla" in memory}
    failed = [r for r in runs if not r["ok"]]
    result = {"ok": not failed and len(med) == len(METHODS), "ms_per_iter": med, "memory_mib": memory,
              "time_ratios": ratios, "memory_ratios": mem_ratios, "rounds": shapes.rounds}
    if failed:
        result["error"] = f"{failed[0]['method']}: {failed[0].get('error', '?')}"
    return result


def export(run: Runner, shapes: Shapes, impl: str, dev) -> dict:
    """Train a short run on a learnable corpus, evaluate its checkpoint, export it to HF, and compare
    the export's logits with megatron's on the same device (tests/gpu/export_logits.py)."""
    from tests.train_helpers import VOCAB, make_corpus

    corpus = make_corpus(run.work / "data" / "tiny_text_document")
    ckpt, hf_dir = run.work / "export_ckpt", run.work / "export_hf"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(hf_dir, ignore_errors=True)
    argv = shapes.export + ["--bf16", "--transformer-impl", impl, "--tokenizer-type", "NullTokenizer",
                            "--vocab-size", VOCAB, "--data-path", corpus, "--split", "90,5,5", "--lr", "1e-3",
                            "--train-iters", "20", "--log-interval", "10", "--eval-iters", "0",
                            "--hidden-dropout", "0", "--attention-dropout", "0",
                            "--save", ckpt, "--save-interval", "20"]
    trained = run.pretrain(argv, "export_train", 180)
    if not trained["ok"]:
        return {"ok": False, "stage": "train", "error": trained.get("error")}
    evaluated = run.run([sys.executable, ROOT / "tools" / "evaluate.py", "--load", ckpt, "--data-path", corpus,
                         "--output-json", run.work / "export_eval.json"], "export_evaluate", 120)
    if evaluated.returncode:
        return {"ok": False, "stage": "evaluate", "error": last_error(evaluated)}
    exported = run.run([sys.executable, ROOT / "tools" / "convert_checkpoint.py", "--to", "hf", "--load", ckpt,
                        "--output", hf_dir], "export_convert", 120)
    if exported.returncode:
        return {"ok": False, "stage": "convert", "error": last_error(exported)}
    compared = run.run([sys.executable, ROOT / "tests" / "gpu" / "export_logits.py", ckpt, hf_dir],
                       "export_logits", 120)
    if compared.returncode:
        return {"ok": False, "stage": "compare logits", "error": last_error(compared)}
    logits = json.loads(compared.stdout.strip().splitlines()[-1])
    result = {"train_loss": trained.get("loss"),
              "eval_mean_nll": json.loads((run.work / "export_eval.json").read_text()).get("mean_nll"), **logits}
    result["ok"] = logits["max_abs_logit_diff"] < logits["tolerance"]
    return result


def gpu_tests(run: Runner, shapes: Shapes, impl: str, dev) -> dict:
    """The gpu-marked tests; skips are counted by reason (Transformer Engine's tests skip without it)."""
    # Only the plugins named here: a machine's own pytest plugins may not suit the carried pytest.
    proc = run.run(["env", "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1", sys.executable, "-m", "pytest", "-q", "-rs",
                    "-p", "pytest_timeout", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"], "gpu_tests", 240)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    reasons = {}
    for n, reason in re.findall(r"^SKIPPED \[(\d+)\] [^:\s]+(?::\d+)?: (.+)$", proc.stdout, re.M):
        reasons[reason] = reasons.get(reason, 0) + int(n)
    result = {"ok": proc.returncode in (0, 5) and not counts.get("failed"), "summary": summary, **counts}
    if reasons:
        result["skip_reasons"] = reasons
    return result


# ---------------------------------------------------------------- summary
def summary_lines(summary: dict) -> list:
    dev = summary.get("device")
    lines = [f"GPU check: {dev['name'] + ' (' + str(dev['memory_gib']) + ' GiB)' if dev else 'no CUDA device'}"
             + (" -- CPU rehearsal at tiny shapes: no GPU figure" if summary.get("cpu_rehearsal") else "")]
    if summary.get("environment_error"):
        lines.append(f"  environment broken: {summary['environment_error']}")
    if summary.get("environment"):
        env = summary["environment"]
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in env.items() if not k.endswith(" from")))
    if summary.get("layers"):
        lines.append(f"  layers: {summary['layers']}")
    for part, result in summary.get("parts", {}).items():
        if result.get("not_run"):
            lines.append(f"  {part:12s} not run: {result['not_run']}")
            continue
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if k != "ok")
        lines.append(f"  {part:12s} {'ok  ' if result['ok'] else 'FAIL'} {figures}")
    if summary.get("seconds"):
        lines.append(f"  total: {summary['seconds']:.0f} s")
    if summary.get("not_run"):
        lines.append("  not run here:")
        lines += [f"    {what}: {why}" for what, why in summary["not_run"].items()]
    return lines


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def write_summary(out: Path, summary: dict, work: Path = None) -> None:
    lines = summary_lines(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    if work is not None and (work / "logs").is_dir():
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # one file: only 8 come back
            tar.add(work / "logs", arcname="logs")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true", help="Fewer iterations and one timing round.")
    ap.add_argument("--cpu-rehearsal", action="store_true",
                    default=os.environ.get("GPU_CHECK_CPU_REHEARSAL") == "1",
                    help="Without CUDA, run every part on the CPU at tiny shapes (exercises the paths).")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="Stop every part after this many seconds (default 450: done within 8 minutes; "
                         "the CPU rehearsal: 1800).")
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary, started = {"cpu_rehearsal": False}, time.time()
    try:
        summary["environment"] = environment()
        from megatron_patch import capabilities

        caps = capabilities.detect()
    except Exception as exc:  # noqa: BLE001 - any import-time failure: missing, or not for this torch
        summary["environment_error"] = f"{type(exc).__name__}: {exc}"
        write_summary(args.out, summary)
        return EXIT_BROKEN
    dev = device(caps)
    summary.update(device=dev, cuda=dev is not None, capabilities=caps.describe(), not_run=not_run(caps, dev))
    if dev is None and not args.cpu_rehearsal:
        summary["parts"] = {p: {"ok": False, "not_run": "no CUDA device"} for p in PARTS}
        write_summary(args.out, summary)
        return EXIT_NO_CUDA
    summary["cpu_rehearsal"] = dev is None
    impl = capabilities.default_transformer_impl(caps)
    summary["layers"] = impl
    shapes = Shapes(on_gpu=dev is not None, quick=args.quick)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rehearsal = dev is None
    budget = args.budget_s or (1800.0 if rehearsal else 450.0)
    run = Runner(work, budget, timeout_scale=5.0 if rehearsal else 1.0)
    summary["parts"] = {}
    for part in PARTS:
        if run.left() <= 0:
            summary["parts"][part] = {"ok": False, "not_run": f"the {budget:.0f} s budget was spent"}
            continue
        start = time.time()
        try:
            result = globals()[part](run, shapes, impl, dev)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not hide the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        result["seconds"] = round(time.time() - start, 1)
        summary["parts"][part] = result
        print(f"gpu check: {part} {'ok' if result['ok'] else 'FAILED'} after {result['seconds']} s", flush=True)
    summary["seconds"] = round(time.time() - started, 1)
    write_summary(args.out, summary, work)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    if not all(r["ok"] for r in summary["parts"].values()):
        return EXIT_FAILED
    return EXIT_NO_CUDA if dev is None else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
