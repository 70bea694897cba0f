"""Shared pieces of the trainer tests: a tiny configuration, a learnable corpus, launchers."""

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 200  # NullTokenizer ids 0..199, end-of-document 200

# 2 layers, hidden 64, seq 32: ~0.1M parameters, ~50 ms per iteration on one CPU core.
TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 4 --global-batch-size 8 "
        "--lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01 "
        "--clip-grad 1.0 --init-method-std 0.02 --hidden-dropout 0 --attention-dropout 0 "
        f"--tokenizer-type NullTokenizer --vocab-size {VOCAB} --log-interval 1 --eval-iters 0 "
        "--seed 1234").split()


def tiny_args(*extra, data=None, mock=False):
    """TINY plus data flags plus `extra` (later flags win in argparse)."""
    data_flags = ["--mock-data"] if mock else ["--data-path", str(data), "--split", "90,5,5"]
    return TINY + data_flags + [str(e) for e in extra]


def make_corpus(prefix, num_docs=200, seed=0, vocab=VOCAB, max_token=None):
    """A .bin/.idx corpus a tiny model can learn: each document walks t -> (3t + 7) mod vocab.

    A bigram model predicts it exactly, so the loss falls from ln(vocab) ~ 5.3 by several nats
    in a few dozen steps. `max_token` puts one token of that id in (for vocabulary checks).
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    prefix = str(prefix)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in range(num_docs):
        t = int(rng.randint(vocab))
        doc = []
        for _ in range(int(rng.randint(20, 60))):
            doc.append(t)
            t = (3 * t + 7) % vocab
        if max_token is not None and d == 0:
            doc[0] = max_token
        doc.append(vocab)  # end of document (NullTokenizer's eod id)
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def run_inprocess(argv, callbacks=None):
    """Train in this process (gloo, world size 1); returns the TrainContext."""
    from megatron_patch.training.pretrain import run

    return run([str(a) for a in argv], callbacks=callbacks)


def losses(ctx):
    return [h["loss"] for h in ctx.history]


def subprocess_env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def pretrain_cmd(argv):
    return [sys.executable, str(ROOT / "pretrain_gpt.py")] + [str(a) for a in argv]


def torchrun_cmd(script, script_args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", str(script)] + [str(a) for a in script_args]


_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+\-naif]+) \|")


def logged_losses(stdout):
    """{iteration: loss} from Megatron-LM style log lines."""
    return {int(m.group(1)): float(m.group(2)) for m in _LINE.finditer(stdout)}


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=1))


def one_error_line(capsys, argv):
    """Runs pretrain_gpt.py's main in-process; asserts exit 1 with one stderr line, returns it."""
    from megatron_patch.training.pretrain import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("pretrain_gpt.py: error: "), err
    return err[0]


def wait_for(pattern, path: Path, timeout=240.0, what=""):
    """The first match of `pattern` in the file at `path` (a log being written), polled until `timeout`."""
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what or pattern}; log:\n{text[-3000:]}")
