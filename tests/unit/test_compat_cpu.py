"""megatron_patch.compat: each CPU answer and each upstream fix, one by one."""

import multiprocessing
import queue

import pytest
import torch

from megatron_patch.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim refuses to run with CUDA")


@pytest.fixture(autouse=True)
def enabled():
    cpu.enable()
    cpu.enable()  # idempotent
    assert cpu.is_enabled()


def test_cuda_device_requests_land_on_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(3, device=0).device.type == "cpu"  # a bare int is a CUDA ordinal
    t = torch.arange(3)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu" and t.to("cuda:0", torch.float32).dtype == torch.float32
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()  # no-op, no error


def test_type_strings_are_cuda_names_but_conversions_still_work():
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu.CpuRNGStatesTracker)
    tracker.reset()
    tracker.add("tp", 123)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork("tp"):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is untouched
    with tracker.fork("tp"):
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("tp", 5)


def test_synchronous_saves_need_no_manager_process(tmp_path):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_patch.compat.dist_checkpointing import use_in_process_results_queue
    from tests.train_helpers import run_inprocess, tiny_args

    use_in_process_results_queue()
    run_inprocess(tiny_args("--train-iters", 3, "--save", tmp_path, "--save-interval", 3, mock=True))
    assert isinstance(filesystem_async._results_queue, queue.Queue)
    assert not [p for p in multiprocessing.active_children() if "Manager" in type(p).__name__ or
                "SyncManager" in p.name]
    assert (tmp_path / "iter_0000003" / "metadata.json").is_file()
