"""TP=2, PP=2 (also interleaved), DP=2 (also with the distributed optimizer, also overlapping grad
reduce / param gather) and TP=2 + sequence parallel with Embed LN each reproduce the 1-process
loss curve; resume across layouts (keeping the checkpoint's vocabulary padding).

All layouts start from one initial checkpoint written by a 1-process run (`--train-iters 0
--save`), because Megatron-LM seeds each pipeline stage differently (seed + 100 x stage), so a
fresh PP=2 model is not the PP=1 model. Dropout is off. Tolerance: |delta loss| <= 5e-5 over
6 iterations (observed ~1e-6: fp32 reductions in a different order; TP layouts differ in the
7th digit of the grad norm).
"""

import json
import subprocess

import pytest

from tests.train_helpers import (ROOT, losses, make_corpus, run_inprocess, subprocess_env, tiny_args,
                                 torchrun_cmd, write_json)

ATOL = 5e-5
ITERS = 6
BIG_VOCAB = ["--vocab-size", 7999]  # NullTokenizer: 8,000 ids, the quickstart's vocabulary size


def base(corpus, *extra):
    return tiny_args("--num-layers", 4, "--train-iters", ITERS, *extra, data=corpus)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    corpus = make_corpus(tmp / "data" / "tiny_text_document")
    ref = {}
    for name, extra in (("vanilla", []), ("embed_ln", ["--embed-layernorm"])):
        init = tmp / f"init_{name}"
        run_inprocess(base(corpus, "--train-iters", 0, "--save", init, "--no-save-optim", "--no-save-rng",
                           *extra))
        ref[name] = losses(run_inprocess(base(corpus, "--load", init, "--save", tmp / f"ref_{name}",
                                              "--save-interval", 3, *extra)))
    # Distributed-optimizer state saved reshardable across TP/PP (gathered on DP rank 0).
    run_inprocess(base(tmp / "data" / "tiny_text_document", "--load", tmp / "init_vanilla", "--save",
                       tmp / "ref_fr", "--save-interval", 3, "--exit-interval", 3, "--use-distributed-optimizer",
                       "--dist-ckpt-optim-fully-reshardable"))
    # Megatron-LM's vocabulary padding depends on TP: with the default --make-vocab-size-divisible-by
    # 128, 8,000 ids pad to 8,064 rows at TP 1 and 8,192 at TP 2; a resume keeps the checkpoint's.
    ref["big_vocab"] = losses(run_inprocess(base(corpus, *BIG_VOCAB, "--save", tmp / "ref_big", "--save-interval", 3)))
    run_inprocess(base(corpus, "--train-iters", 0, "--make-vocab-size-divisible-by", 1, "--save", tmp / "odd_vocab",
                       "--no-save-optim", "--no-save-rng"))  # 201 rows: no TP size but 1 divides them
    init, embed_init = tmp / "init_vanilla", tmp / "init_embed_ln"
    spec = [
        ("tp2", ["--tensor-model-parallel-size", 2, "--load", init]),
        ("pp2", ["--pipeline-model-parallel-size", 2, "--load", init]),
        ("pp2_vp2", ["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1,
                     "--load", init]),
        ("dp2", ["--load", init]),
        ("dp2_distopt", ["--use-distributed-optimizer", "--load", init, "--save", tmp / "dopt",
                         "--save-interval", 3]),
        ("dp2_distopt_overlap", ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                 "--overlap-param-gather", "--load", init]),
        ("dp2_distopt_resumed", ["--use-distributed-optimizer", "--load", tmp / "dopt", "--ckpt-step", 3]),
        ("tp2_sp_embed_ln", ["--tensor-model-parallel-size", 2, "--sequence-parallel", "--embed-layernorm",
                             "--load", embed_init]),
        ("tp2_resumed_from_tp1", ["--tensor-model-parallel-size", 2, "--load", tmp / "ref_vanilla",
                                  "--ckpt-step", 3]),
        ("pp2_resumed_from_pp1", ["--pipeline-model-parallel-size", 2, "--load", tmp / "ref_vanilla",
                                  "--ckpt-step", 3]),
        ("tp2_distopt_resumed_from_tp1", ["--tensor-model-parallel-size", 2, "--use-distributed-optimizer",
                                          "--load", tmp / "ref_fr"]),
        ("tp2_distopt_from_dp_reshardable", ["--tensor-model-parallel-size", 2, "--use-distributed-optimizer",
                                             "--load", tmp / "dopt", "--ckpt-step", 3]),
        ("tp2_big_vocab_from_tp1", [*BIG_VOCAB, "--tensor-model-parallel-size", 2, "--load", tmp / "ref_big",
                                    "--ckpt-step", 3, "--save", tmp / "big_tp2", "--exit-interval", 5]),
        ("tp2_odd_vocab_from_tp1", ["--tensor-model-parallel-size", 2, "--make-vocab-size-divisible-by", 1,
                                    "--load", tmp / "odd_vocab"]),
    ]
    write_json(tmp / "spec.json", [{"name": n, "argv": [str(a) for a in base(corpus, *extra)]}
                                   for n, extra in spec])
    out = tmp / "out"
    out.mkdir()
    proc = subprocess.run(torchrun_cmd(ROOT / "tests/distributed/train_multi_run_worker.py",
                                       [tmp / "spec.json", out]),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {}
    for name, _ in spec:
        per_rank = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        if "error" in per_rank[0]:
            results[name] = per_rank[0]["error"]
            continue
        curves = [[h["loss"] for h in r["history"]] for r in per_rank]
        curves = [c for c in curves if c and c[0] is not None]  # ranks of the last stage
        assert curves and all(c == curves[0] for c in curves), curves
        results[name] = curves[0]
    # ... and back to TP 1 from the TP 2 checkpoint (iteration 5), still 8,064 rows.
    from megatron.core import dist_checkpointing

    results["big_tp2_padded"] = dist_checkpointing.load_common_state_dict(str(tmp / "big_tp2" / "iter_0000005"))[
        "padded_vocab_size"]
    results["tp1_big_vocab_from_tp2"] = losses(run_inprocess(base(corpus, *BIG_VOCAB, "--load", tmp / "big_tp2")))
    return ref, results


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= ATOL for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_vp2", "dp2", "dp2_distopt", "dp2_distopt_overlap"])
def test_layout_matches_one_process(runs, layout):
    ref, got = runs
    assert close(got[layout], ref["vanilla"]), (got[layout], ref["vanilla"])


@pytest.mark.slow
def test_tensor_and_sequence_parallel_with_embed_layernorm(runs):
    ref, got = runs
    assert close(got["tp2_sp_embed_ln"], ref["embed_ln"]), (got["tp2_sp_embed_ln"], ref["embed_ln"])
    assert not close(ref["embed_ln"], ref["vanilla"])  # the option is really on


@pytest.mark.slow
def test_distributed_optimizer_resume_is_exact(runs):
    _, got = runs
    assert got["dp2_distopt_resumed"] == got["dp2_distopt"][3:]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tp2_resumed_from_tp1", "pp2_resumed_from_pp1", "tp2_distopt_resumed_from_tp1"])
def test_resume_at_a_different_layout(runs, run):
    ref, got = runs
    assert close(got[run], ref["vanilla"][3:]), (got[run], ref["vanilla"])


@pytest.mark.slow
def test_dp_reshardable_optimizer_state_refuses_a_new_tp_size_clearly(runs):
    _, got = runs
    assert "cannot be resharded" in got["tp2_distopt_from_dp_reshardable"]
    assert "--dist-ckpt-optim-fully-reshardable" in got["tp2_distopt_from_dp_reshardable"]


@pytest.mark.slow
def test_resume_at_another_tp_size_keeps_the_checkpoints_vocabulary_padding(runs):
    """TP 1 -> TP 2 -> TP 1 with the default --make-vocab-size-divisible-by (8,064 vs 8,192 rows)."""
    ref, got = runs
    resumed = got["tp2_big_vocab_from_tp1"]
    assert close(resumed, ref["big_vocab"][3:5]), (resumed, ref["big_vocab"])
    assert got["big_tp2_padded"] == 8064
    assert close(got["tp1_big_vocab_from_tp2"], ref["big_vocab"][5:]), (got["tp1_big_vocab_from_tp2"], ref["big_vocab"])


@pytest.mark.slow
def test_a_tp_size_that_cannot_split_the_checkpoints_vocabulary_is_refused_naming_those_that_can(runs):
    _, got = runs
    assert got["tp2_odd_vocab_from_tp1"] == (
        "the checkpoint's padded vocabulary of 201 rows cannot be split over TP 2; resume at a tensor-parallel "
        "size that divides it and the 4 attention heads: 1")
