"""Shared fixtures: a one-process megatron-core environment on CPU (gloo)."""

import os
import socket

import pytest
import torch


# tests/cross_version/ compares this environment (megatron-core 0.19.x) with another interpreter's
# (0.16.1): only .ci/lanes/20-py312.sh, which names that interpreter, collects it.
collect_ignore = [] if os.environ.get("MEGATRON_PATCH_REFERENCE_PYTHON") else ["cross_version"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mcore():
    """torch.distributed (gloo, world size 1) + parallel_state TP=PP=1 + CPU compat, seeded."""
    from megatron.core import parallel_state

    from megatron_patch.training.initialize import init_single_process, teardown

    init_single_process(1234)
    yield parallel_state
    teardown()  # also frees the gloo subgroups' threads


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
