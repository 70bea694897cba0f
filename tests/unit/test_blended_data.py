"""Blended data (`--data-path W1 P1 W2 P2 ...`, and Megatron-LM's --train/valid/test-data-path):
megatron-core's BlendedDataset draws each sample from the dataset whose share is furthest behind
its weight, and tags it with a numpy `dataset_id`; the trainer batches that like any field."""

import collections

import pytest

from megatron_patch.training import data
from megatron_patch.training.arguments import parse_and_validate
from tests.train_helpers import TINY, losses, make_corpus, run_inprocess


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return [make_corpus(root / name / "text_document", seed=seed) for seed, name in enumerate("abc")]


def _blend(weights, prefixes):
    return [str(x) for pair in zip(weights, prefixes) for x in pair]


@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.2, 0.3, 0.5), (1, 1, 2)])
def test_blend_sample_counts_follow_the_weights(corpora, weights):
    prefixes = corpora[:len(weights)]
    args = parse_and_validate(TINY + ["--data-path", *_blend(weights, prefixes), "--split", "90,5,5",
                                      "--train-iters", "25"])
    train, _, _ = data.build_datasets(args, data.build_tokenizer(args))
    assert [ds.dataset.path_prefix for ds in train.datasets] == prefixes
    n = 25 * 8
    # What the trainer reads: the micro-batches of two data-parallel ranks, over the whole run.
    counts = collections.Counter()
    for rank in (0, 1):
        it = data.MicroBatchIterator(train, 4, rank, 2, 0, "cpu", prefetch=False)
        for _ in range(n // 8):
            counts.update(int(i) for i in next(it)["dataset_id"])
    assert sum(counts.values()) == n
    for k, w in enumerate(weights):
        assert abs(counts[k] - n * w / sum(weights)) <= 1, (counts, weights)


def test_the_same_prefix_twice_and_three_datasets_train(corpora):
    twice = run_inprocess(TINY + ["--data-path", corpora[0], corpora[0], "--split", "90,5,5", "--train-iters", 3])
    three = run_inprocess(TINY + ["--data-path", *_blend((0.2, 0.3, 0.5), corpora), "--split", "90,5,5",
                                  "--train-iters", 3])
    assert len(losses(twice)) == len(losses(three)) == 3


def test_per_split_paths_train_on_a_blend_and_validate_on_another_dataset(corpora, capsys):
    ctx = run_inprocess(TINY + ["--train-data-path", *_blend((0.5, 0.5), corpora[:2]),
                                "--valid-data-path", corpora[2], "--eval-iters", 2, "--eval-interval", 2,
                                "--train-iters", 3])
    assert len(losses(ctx)) == 3
    assert "validation loss at iteration 2" in capsys.readouterr().out
    assert [ds.dataset.path_prefix for ds in ctx.datasets[0].datasets] == corpora[:2]
    assert ctx.datasets[1].dataset.path_prefix == corpora[2]


def test_a_blended_run_resumes_exactly(corpora, tmp_path):
    argv = TINY + ["--data-path", *_blend((0.3, 0.7), corpora[:2]), "--split", "90,5,5", "--train-iters", 6,
                   "--hidden-dropout", 0.1]
    full = run_inprocess(argv + ["--save", tmp_path, "--save-interval", 3])
    resumed = run_inprocess(argv + ["--load", tmp_path, "--ckpt-step", 3])
    assert losses(resumed) == losses(full)[3:]
