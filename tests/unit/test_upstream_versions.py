"""What differs between megatron-core releases (megatron_patch/upstream.py), checked on the
release this interpreter has: both CI lanes run this file (0.16.1 on Python 3.11, 0.19.x on 3.12).
"""

import logging

import pytest
import torch

from megatron_patch import upstream
from tests.train_helpers import make_corpus, one_error_line, run_inprocess, tiny_args


def test_the_release_is_in_the_supported_range():
    assert upstream.Version("0.16.1") <= upstream.VERSION < upstream.Version("0.20")
    assert upstream.VERSION.local is None  # 0.19's "+<git hash>" suffix is dropped


def test_mlp_submodules_are_read_from_upstreams_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    mlp = upstream.mlp_submodules(spec.submodules.mlp)
    assert mlp.linear_fc1 is not None and mlp.linear_fc2 is not None


def test_the_cuda_build_notice_alone_is_dropped():
    import megatron_patch  # noqa: F401 - installs the filter

    logger = logging.getLogger("torch.utils.cpp_extension")
    record = lambda msg: logging.LogRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)  # noqa: E731
    assert not all(f.filter(record("No CUDA runtime is found, using CUDA_HOME='/usr/local'")) for f in logger.filters)
    assert all(f.filter(record("Error building extension 'x'")) for f in logger.filters)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "tiny_text_document")


@pytest.fixture(scope="module", params=["regular", "distributed"])
def saved(request, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    extra = ["--use-distributed-optimizer"] if request.param == "distributed" else []
    extra += ["--lr-decay-iters", 8]  # the same schedule whatever --train-iters
    run_inprocess(tiny_args("--train-iters", 4, "--save", root, "--save-interval", 4, *extra, data=corpus))
    return root, extra


def test_the_common_state_is_where_this_release_writes_it(saved):
    root, _ = saved
    path = str(root / "iter_0000004")
    expected = "torch_dist" if upstream.COMMON_STATE_IN_TORCH_DIST else "common.pt"
    assert upstream.common_state_location(path) == expected
    common = upstream.load_common_state(path)
    assert common["iteration"] == 4 and common["megatron_core_version"] == str(upstream.VERSION)


@pytest.mark.parametrize("keep", ["", "--use-checkpoint-opt_param-scheduler"])
def test_a_resume_with_another_lr_follows_the_chosen_schedule(corpus, saved, keep):
    """--override-opt_param-scheduler: this run's --lr from the first resumed step (0.16.1 used
    to keep the checkpoint's, silently; 0.19 refused the load); --use-checkpoint-opt_param-scheduler:
    the checkpoint's, as if --lr had not changed."""
    root, extra = saved
    lr = "1e-3" if not keep else "3e-3"  # what the resumed steps must follow
    flag = keep or "--override-opt_param-scheduler"
    resumed = run_inprocess(tiny_args("--train-iters", 6, "--lr", "1e-3", "--load", root, flag, *extra,
                                      data=corpus))
    fresh = run_inprocess(tiny_args("--train-iters", 6, "--lr", lr, *extra, data=corpus))
    assert [h["iteration"] for h in resumed.history] == [5, 6]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in fresh.history[4:]]
    assert {g["max_lr"] for g in resumed.optimizer.param_groups} == {float(lr)}


def test_a_resume_with_another_lr_alone_says_how_to_proceed(corpus, saved, capsys):
    root, extra = saved
    line = one_error_line(capsys, tiny_args("--train-iters", 6, "--lr", "1e-3", "--load", root, *extra, data=corpus))
    assert "lr schedule differs from the checkpoint's" in line and "--override-opt_param-scheduler" in line


def test_cpu_grad_sync_stream_waits_are_no_ops():
    from megatron_patch.compat import cpu

    if torch.cuda.is_available():
        pytest.skip("CPU answers only")
    cpu.enable()
    stream = torch.cuda.current_stream()
    stream.wait_event(object()), stream.wait_stream(stream)
