"""tools/evaluate.py: perplexity and LAMBADA accuracy of trainer checkpoints.

One tiny model (TINY: 2 layers, d=64, seq 32) is trained for 60 steps on a corpus whose every
document is one 12-token sentence, so it memorises the sentence (LAMBADA accuracy 1 on it, 0 with
a wrong last word); perplexity is measured on a held-out corpus of make_corpus's walks. Reference
numbers are computed here without the tool's code: the model built from the training flags with
build_gpt_model and loaded with dist_checkpointing, one window or example per forward pass, NLL
by F.cross_entropy. Scoring arithmetic (multi-token targets, batching with padding, windows) is
also checked against hand-made logits.
"""

import json
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_patch.evaluation import inputs, scoring
from megatron_patch.training.data import NullTokenizer
from tests.train_helpers import ROOT, VOCAB, make_corpus, run_inprocess, subprocess_env, tiny_args
from tools import evaluate

SENTENCE = [17, 42, 99, 3, 150, 8, 77, 120, 61, 5, 190, 33]
SEQ, ITERS, PADDED = 32, 60, 256
OPTIONS = ["--wesar", "--embed-layernorm", "--transformer-impl", "local"]


def sentence_corpus(prefix, copies=100):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(copies):
        builder.add_document(torch.tensor(SENTENCE + [VOCAB]), [len(SENTENCE) + 1])
    builder.finalize(f"{prefix}.idx")
    return prefix


def train(path, data, iters, *flags):
    run_inprocess(tiny_args("--train-iters", iters, "--lr", "1e-2", "--min-lr", "1e-3", "--save", path,
                            "--save-interval", max(iters, 1), "--no-save-optim", "--no-save-rng", *flags, data=data))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    data = sentence_corpus(tmp / "data" / "sentence")
    return SimpleNamespace(tmp=tmp, ckpt=train(tmp / "ckpt", data, ITERS),
                           options_ckpt=train(tmp / "ckpt_options", data, 3, *OPTIONS),
                           held=make_corpus(tmp / "data" / "held", num_docs=12, seed=1))


def tool(run, *argv):
    """evaluate.py's results (in this process, through main and --output-json)."""
    out = run.tmp / "result.json"
    assert evaluate.main([str(a) for a in argv] + ["--output-json", str(out)]) == 0
    return json.loads(out.read_text())


@contextmanager
def reference_model(ckpt_dir, *flags):
    """The model as the trainer builds it from TINY + flags, weights read with dist_checkpointing."""
    from megatron.core import dist_checkpointing

    from megatron_patch.model import build_gpt_model
    from megatron_patch.training.arguments import parse_and_validate
    from megatron_patch.training.initialize import init_single_process, teardown

    init_single_process()
    try:
        args = parse_and_validate(tiny_args("--train-iters", 10, *flags, mock=True), world_size=1)
        model = build_gpt_model(args.transformer_config, PADDED, SEQ, transformer_impl="local",
                                share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
        step = int((ckpt_dir / "latest_checkpointed_iteration.txt").read_text())
        loaded = dist_checkpointing.load({"model0": model.sharded_state_dict()}, str(ckpt_dir / f"iter_{step:07d}"))
        model.load_state_dict(loaded["model0"])
        with torch.no_grad():
            yield lambda ids: model.eval()(ids[None], torch.arange(len(ids))[None], attention_mask=None)[0]
    finally:
        teardown()


def reference_perplexity(logits, tokens):
    """Non-overlapping windows of SEQ inputs, one per forward pass: (targets, mean NLL)."""
    nll = []
    for start in range(0, len(tokens) - 1, SEQ):
        targets = tokens[start + 1:start + SEQ + 1]
        nll.append(F.cross_entropy(logits(tokens[start:start + len(targets)]), targets, reduction="none"))
    nll = torch.cat(nll).double()
    return len(nll), nll.mean().item()


def held_tokens(prefix):
    return torch.from_numpy(np.fromfile(f"{prefix}.bin", dtype=np.uint16).astype(np.int64))  # the raw .bin


@pytest.mark.parametrize("which", ["ckpt", "options_ckpt"])
def test_perplexity_equals_direct_computation(run, which):
    got = tool(run, "--load", getattr(run, which), "--data-path", run.held, "--micro-batch-size", 3)
    tokens = held_tokens(run.held)
    with reference_model(getattr(run, which), *(OPTIONS if which == "options_ckpt" else [])) as logits:
        count, mean = reference_perplexity(logits, tokens)
    assert got["tokens"] == count == len(tokens) - 1
    assert abs(got["mean_nll"] - mean) < 1e-6  # fp32 logits; batched vs one window per pass
    assert abs(got["perplexity"] / np.exp(mean) - 1) < 1e-6
    assert (got["seq_length"], got["stride"], got["iteration"]) == (SEQ, SEQ, ITERS if which == "ckpt" else 3)


def test_stride_one_gives_every_token_a_full_window(run):
    """--stride 1: token p is predicted from the min(p, SEQ) tokens before it (closed form)."""
    got = tool(run, "--load", run.ckpt, "--data-path", run.held, "--stride", 1)
    tokens = held_tokens(run.held)
    with reference_model(run.ckpt) as logits:
        nll = [F.cross_entropy(logits(tokens[max(0, p - SEQ):p])[-1], tokens[p]).item() for p in range(1, len(tokens))]
    assert got["tokens"] == len(nll) and got["stride"] == 1
    assert abs(got["mean_nll"] - np.mean(nll)) < 1e-6


def test_jsonl_and_text_equal_the_bin(run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    held = IndexedDataset(str(run.held))  # kept alive: its documents are views of its memory map
    docs = [" ".join(map(str, doc[:-1])) for doc in held[0:len(held)]]  # without the EOD
    (run.tmp / "held.jsonl").write_text("".join(json.dumps({"body": d}) + "\n\n" for d in docs))
    (run.tmp / "held.txt").write_text("\n".join(docs) + "\n")
    ref = tool(run, "--load", run.ckpt, "--data-path", run.held)
    for argv in (["--input", run.tmp / "held.jsonl", "--json-key", "body"], ["--input", run.tmp / "held.txt"]):
        got = tool(run, "--load", run.ckpt, *argv)
        assert (got["tokens"], got["mean_nll"]) == (ref["tokens"], ref["mean_nll"])


def lambada_lines(wrong):
    """Pieces of the training stream (sentence, EOD, sentence, ...); the last one is 43 tokens long."""
    stream = (SENTENCE + [VOCAB]) * 4
    lines = [stream[i:j] for i, j in ((0, 12), (3, 5), (5, 12), (10, 20), (0, 43))]
    texts = [" ".join(str(t) for t in line[:-1] + [(line[-1] + 1) % VOCAB if wrong else line[-1]]) for line in lines]
    return texts + ["17"]  # one word: skipped


def test_lambada_memorised_sentence(run):
    results = {}
    for wrong in (False, True):
        path = run.tmp / f"lambada_{wrong}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lambada_lines(wrong)))
        results[wrong] = tool(run, "--load", run.ckpt, "--input", path, "--task", "lambada", "--micro-batch-size", 2)
    right, wrong = results[False], results[True]
    assert (right["examples"], right["skipped"], right["truncated"]) == (5, 1, 1)
    assert (right["accuracy"], wrong["accuracy"]) == (1.0, 0.0)
    assert right["word_perplexity"] < 1.5 < 1000 < wrong["word_perplexity"]
    assert right["token_perplexity"] == pytest.approx(right["word_perplexity"], rel=1e-12)  # 1 token per word
    examples, _, _ = inputs.lambada_examples(lambada_lines(False), NullTokenizer(VOCAB), SEQ)
    with reference_model(run.ckpt) as logits:  # one example per forward pass, no padding
        nll = [F.cross_entropy(logits(torch.tensor(c + t[:-1]))[-len(t):], torch.tensor(t), reduction="sum").item()
               for c, t in examples]
    assert right["word_perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)


def test_bf16_checkpoint_evaluates_as_its_rounded_weights(run):
    from megatron_patch.export import megatron_io

    _, common = megatron_io.read_common(str(run.ckpt))
    args = megatron_io.args_from_saved(common["args"], bf16=True, attention_softmax_in_fp32=True)
    with megatron_io.loaded_checkpoint(str(run.ckpt)) as (fp32_model, _, _):
        model = megatron_io.build_model(args, PADDED)  # bf16 parameters, as a --bf16 run saves them
        model.load_state_dict(fp32_model.state_dict())
        megatron_io.save_model_checkpoint(model, args, str(run.tmp / "bf16"), VOCAB + 1, PADDED)
    got = tool(run, "--load", run.tmp / "bf16", "--data-path", run.held)
    with reference_model(run.tmp / "bf16") as logits:  # fp32 model, bf16 values
        _, mean = reference_perplexity(logits, held_tokens(run.held))
    assert abs(got["mean_nll"] - mean) < 1e-6


# ----------------------------------------------------------------- scoring arithmetic, no model

def test_windows_score_every_target_once():
    assert scoring.windows(10, 4, 2) == [scoring.Window(0, 4, 4), scoring.Window(2, 6, 2),
                                         scoring.Window(4, 8, 2), scoring.Window(6, 9, 1)]
    assert scoring.windows(10, 4, 4) == [scoring.Window(0, 4, 4), scoring.Window(4, 8, 4), scoring.Window(8, 9, 1)]
    for n, seq, stride in ((2, 5, 5), (33, 32, 32), (100, 32, 1), (100, 32, 7), (64, 32, 32)):
        scored = []
        for i, w in enumerate(scoring.windows(n, seq, stride)):
            assert 0 < w.end - w.start <= seq and 0 < w.scored <= w.end - w.start
            first = w.end - w.scored + 1  # first target position this window scores
            assert i == 0 or first - 1 - w.start >= seq - stride  # context of every scored target
            scored += range(first, w.end + 1)
        assert scored == list(range(1, n))


def bigram_logits(table):
    """A fake model: the logits at each position are table[token at that position]."""
    return lambda tokens: table[tokens]


def test_lambada_scoring_by_hand():
    table = torch.tensor([[0., 0, 0, 0, 0, 0], [0, 0, 3, 1, 0, 0], [0, 0, 0, 2, 0, 1],
                          [0, 0, 0, 0, 0, 0], [0, 0, 4, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    examples = [([0, 1], [2, 3]), ([4], [2, 5]), ([1, 1, 1, 1], [2])]  # right, wrong at its 2nd token, right
    logp = torch.log_softmax(table, -1).double()
    words = [-(logp[1, 2] + logp[2, 3]), -(logp[4, 2] + logp[2, 5]), -logp[1, 2]]
    for batch_size in (1, 2, 8):  # rows of different lengths are right-padded together
        got = scoring.lambada(examples, bigram_logits(table), batch_size)
        assert (got["examples"], got["correct"], got["target_tokens"]) == (3, 2, 5)
        assert got["accuracy"] == pytest.approx(2 / 3)
        assert got["word_perplexity"] == pytest.approx(float(torch.stack(words).mean().exp()), rel=1e-6)
        assert got["token_perplexity"] == pytest.approx(float((sum(words) / 5).exp()), rel=1e-6)


def test_perplexity_scoring_by_hand():
    table = torch.randn(7, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    expected = -torch.log_softmax(table, -1)[tokens[:-1], tokens[1:]].double().mean().item()
    for seq, stride, batch in ((8, 8, 3), (8, 3, 2), (49, 49, 1), (64, 64, 4)):  # context-free: all equal
        got = scoring.perplexity(tokens.numpy(), bigram_logits(table), seq, stride, batch)
        assert got["tokens"] == 49 and got["mean_nll"] == pytest.approx(expected, rel=1e-6)


class CharTokenizer:
    eod = 0

    def tokenize(self, text):
        return [ord(c) for c in text]


def test_lambada_examples_split_skip_truncate():
    assert inputs.split_last_word("  the cat  sat \n") == ("the cat", " sat")
    assert inputs.split_last_word("x y x") == ("x y", " x")
    assert inputs.split_last_word(" one ") is None
    examples, skipped, truncated = inputs.lambada_examples(["ab cd", "solo", "abcdef gh", "a bcdefgh"],
                                                           CharTokenizer(), seq_length=5)
    # "abcdef gh": context keeps its last 5 + 1 - 3 = 3 tokens; "a bcdefgh": target " bcdefgh" > 5 tokens
    assert examples == [([97, 98], [32, 99, 100]), ([100, 101, 102], [32, 103, 104])]
    assert (skipped, truncated) == (2, 1)


# ----------------------------------------------------------------- bad input: one line, exit 1

@pytest.mark.parametrize("argv, named", [
    (["--load", "/nonexistent/ckpt", "--data-path", "x"], "--load /nonexistent/ckpt: no such directory"),
    (["--load", "."], "no data: pass --data-path"),
    (["--load", ".", "--data-path", "x", "--input", "y"], "--data-path and --input are exclusive"),
    (["--load", ".", "--data-path", "/nonexistent/x"], "/nonexistent/x.bin not found"),
    (["--load", ".", "--data-path", "x", "--task", "lambada"], "--task lambada needs the texts"),
    (["--load", ".", "--input", "/nonexistent.jsonl"], "/nonexistent.jsonl not found"),
    (["--load", ".", "--input", "README.md", "--stride", "0"], "--stride must be at least 1"),
    (["--data-path", "x"], "required: --load"),
    (["--load", ".", "--input", "README.md", "--output-json", "/nonexistent/r.json"], "directory does not exist"),
])
def test_bad_command_line_is_one_line(argv, named):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), *argv], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("evaluate.py: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert named in proc.stderr


def test_bad_data_is_one_line(run, capsys):
    (run.tmp / "empty.jsonl").write_text("\n  \n")
    (run.tmp / "words.jsonl").write_text('{"text": "17"}\n{"text": "  "}\n')
    (run.tmp / "nockpt").mkdir()
    wide = make_corpus(run.tmp / "data" / "wide", num_docs=2, vocab=300)
    cases = [
        (["--input", run.tmp / "empty.jsonl"], "0 tokens (empty documents are skipped)"),
        (["--input", run.tmp / "words.jsonl", "--task", "lambada"], "no text of at least 2 words (1 skipped)"),
        (["--data-path", run.held, "--stride", 33], "--stride 33 exceeds the window (32 tokens)"),
        (["--data-path", run.held, "--seq-length", 64], "exceeds the model's 32 positions"),
        (["--data-path", wide], "holds token id 300, but the checkpoint's vocabulary has 201 ids"),
        (["--input", run.tmp / "empty.jsonl", "--vocab-size", 100],
         "has 101 ids, but the checkpoint was trained with 201"),
        (["--input", run.tmp / "words.jsonl", "--json-key", "body"], "line 1 has no key 'body'"),
    ]
    for argv, named in cases:
        assert evaluate.main(["--load", str(run.ckpt)] + [str(a) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("evaluate.py: error: ") and err.count("\n") == 1 and named in err, err
    assert evaluate.main(["--load", str(run.tmp / "nockpt"), "--data-path", str(run.held)]) == 1
    assert "no checkpoint (latest_checkpointed_iteration.txt missing)" in capsys.readouterr().err
    (run.tmp / "nockpt" / "latest_checkpointed_iteration.txt").write_text("1")
    (run.tmp / "nockpt" / "iter_0000001").mkdir()
    for marker, named in ((None, "is not a distributed checkpoint"), ("megatron_patch_deepspeed.json",
                                                                       "is a DeepSpeed checkpoint")):
        if marker:
            (run.tmp / "nockpt" / "iter_0000001" / marker).write_text("{}")
        assert evaluate.main(["--load", str(run.tmp / "nockpt"), "--data-path", str(run.held)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err, err


def test_lambada_target_is_the_continuation_of_the_context(tmp_path):
    """SentencePiece's dummy prefix: " sat" tokenized alone is ["▁", "▁sat"], a "▁" that never
    follows the context in running text. The target is what tokenizing context + target adds to
    the context's tokens (lm-evaluation-harness's split), i.e. ["▁sat"]."""
    from megatron_patch.tokenizer import SentencePieceTokenizer
    from tests.unit.test_data_pipeline import make_documents, train_tokenizer, write_jsonl

    train_tokenizer.main(["--input", str(write_jsonl(tmp_path / "docs.jsonl", make_documents(300))),
                          "--vocab-size", "400", "--output-prefix", str(tmp_path / "tok"), "--threads", "1"])
    tokenizer = SentencePieceTokenizer(str(tmp_path / "tok.model"))
    text = "the school house of the king"
    [(context, target)], _, _ = inputs.lambada_examples([text], tokenizer, SEQ)
    assert context + target == tokenizer.tokenize(text)
    assert context == tokenizer.tokenize("the school house of the")
    alone = tokenizer.tokenize(" king")
    assert len(alone) == len(target) + 1 and alone[1:] == target  # the extra "▁" piece
