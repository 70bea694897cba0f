#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py against the bare tokenizer, side by side.

For the same corpus it times (best of --repeats, runs interleaved):
  raw        tokenizer.tokenize(text) for every document, texts already in memory, one process
  workers=N  the whole pipeline: read the jsonl, parse, tokenize, write .bin/.idx (in-process
             call of preprocess(); the one-off megatron-core import is done before timing)
and prints MB/s of text (UTF-8 bytes of the documents), the pipeline overhead at one worker
(time / raw time - 1; aim <= 20%) and the speed-up of N workers over one (aim >= 1.6x at 2).
CPU seconds (this process plus the reaped pool workers) are shown too: on a shared machine
they are a steadier measure of the overhead than wall time.

Usage:
  python tools/prepare_corpus.py --output data/wiki.jsonl        # once
  python -m benchmarks.bench_preprocess --input data/wiki.jsonl [--tokenizer-model M.model]
Without --tokenizer-model it trains an 8k BPE model on the input first (about a second).
"""
import argparse
import json
import os
import sys
import tempfile
import time

from megatron_patch.tokenizer import build_tokenizer
from tools import preprocess_data, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, times: list) -> None:
    """Append (wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    times.append((time.perf_counter() - wall, cpu_seconds() - cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=os.path.join(ROOT, "data", "wiki.jsonl"))
    parser.add_argument("--tokenizer-model", help="sentencepiece model (default: train 8k BPE)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isfile(args.input):
        sys.exit(f"error: {args.input} not found; make it with "
                 f"python tools/prepare_corpus.py --output {args.input}")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.tokenizer_model
        if model is None:
            model = os.path.join(tmp, "bench.model")
            train_tokenizer.main(["--input", args.input, "--vocab-size", "8000", "--model-type",
                                  "bpe", "--output-prefix", model[:-len(".model")]])
        tokenizer = build_tokenizer("SentencePieceTokenizer", model)
        with open(args.input, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        preprocess_data.batch_builder_class()  # import megatron-core outside the timings

        def pipeline(workers):
            argv = ["--input", args.input, "--output-prefix", os.path.join(tmp, f"w{workers}"),
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                    "--append-eod", "--workers", str(workers)]
            return lambda: preprocess_data.preprocess(preprocess_data.parse_args(argv))

        times = {"raw": [], **{w: [] for w in args.workers}}
        for _ in range(args.repeats):
            timed(lambda: [tokenizer.tokenize(t) for t in texts], times["raw"])
            for w in args.workers:
                timed(pipeline(w), times[w])

    best = {k: min(wall for wall, _ in v) for k, v in times.items()}
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    print(f"corpus: {args.input}: {len(texts)} documents, {megabytes:.2f} MB of text; "
          f"vocab {tokenizer.vocab_size}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; best of {args.repeats}")
    print(f"{'run':<12}{'wall s':>8}{'MB/s':>8}{'x raw':>7}{'CPU s':>8}")
    for key, seconds in best.items():
        name = "raw" if key == "raw" else f"workers={key}"
        print(f"{name:<12}{seconds:>8.3f}{megabytes / seconds:>8.2f}"
              f"{best['raw'] / seconds:>7.2f}{cpu[key]:>8.3f}")
    if 1 in best:
        print(f"overhead at 1 worker: {100 * (best[1] / best['raw'] - 1):+.1f}% wall, "
              f"{100 * (cpu[1] / cpu['raw'] - 1):+.1f}% CPU (aim <= 20%)")
        for w in args.workers:
            if w > 1:
                print(f"speed-up of {w} workers over 1: {best[1] / best[w]:.2f}x "
                      "(aim >= 1.6x at 2)")


if __name__ == "__main__":
    main()
