"""Checkpoints: exact resume in one process, atomic writes, the init-checkpoint workflow."""

import contextlib
import os
import subprocess

import pytest
import torch

from megatron_patch.training import checkpointing
from megatron_patch.training.callbacks import Callback
from tests.train_helpers import losses, one_error_line, run_inprocess, tiny_args


def _params(ctx):
    return {n: p.detach().clone() for n, p in ctx.model[0].named_parameters()}


def _adam_state(ctx):
    inner = ctx.optimizer.chained_optimizers[0].optimizer
    return [{k: v.clone() for k, v in inner.state[p].items()} for g in inner.param_groups for p in g["params"]]


@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer"], ["--data-parallel-random-init"]])
def test_resume_continues_bit_exactly(tmp_path, extra):
    argv = tiny_args("--train-iters", 6, "--hidden-dropout", 0.1, *extra, mock=True)  # dropout: RNG restored too
    full = run_inprocess(argv + ["--save", tmp_path / "a", "--save-interval", 3])
    resumed = run_inprocess(argv + ["--load", tmp_path / "a", "--ckpt-step", 3])
    assert losses(resumed) == losses(full)[3:]
    assert [h["grad_norm"] for h in resumed.history] == [h["grad_norm"] for h in full.history][3:]
    pa, pb = _params(full), _params(resumed)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    for sa, sb in zip(_adam_state(full), _adam_state(resumed)):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert float(sb["step"]) == 6.0


def test_layout_and_contents_and_tracker(tmp_path):
    run_inprocess(tiny_args("--train-iters", 4, "--save", tmp_path, "--save-interval", 2, mock=True))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000004", checkpointing.TRACKER]
    assert (tmp_path / checkpointing.TRACKER).read_text() == "4"
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "iter_0000004"))
    assert common["iteration"] == 4 and common["consumed_train_samples"] == 32
    assert common["layout"] == {"tp": 1, "pp": 1, "dp": 1} and common["padded_vocab_size"] == 256


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    real_save, calls = dist_checkpointing.save, []

    def dying_save(sd, directory, **kw):
        calls.append(directory)
        if len(calls) == 2:  # second checkpoint: write half of it, then "crash"
            open(os.path.join(directory, "__0_0.distcp"), "wb").write(b"partial")
            raise KeyboardInterrupt("simulated crash during save")
        return real_save(sd, directory, **kw)

    monkeypatch.setattr(dist_checkpointing, "save", dying_save)
    argv = tiny_args("--train-iters", 4, "--save", tmp_path, "--save-interval", 2, mock=True)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(argv)
    assert (tmp_path / checkpointing.TRACKER).read_text() == "2"
    assert not (tmp_path / "iter_0000004.tmp").exists() and not (tmp_path / "iter_0000004").exists()  # removed
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    resumed = run_inprocess(argv + ["--load", tmp_path])  # resumes from 2, re-saves 4 cleanly
    assert len(resumed.history) == 2 and resumed.history[0]["iteration"] == 3
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000004", checkpointing.TRACKER]


def test_initial_checkpoint_then_finetune_style_load(tmp_path):
    """--train-iters 0 --save writes the initial weights (used to compare layouts from one init)."""
    init = tmp_path / "init"
    run_inprocess(tiny_args("--train-iters", 0, "--save", init, "--no-save-optim", "--no-save-rng", mock=True))
    assert (init / checkpointing.TRACKER).read_text() == "0"
    a = run_inprocess(tiny_args("--train-iters", 3, "--load", init, mock=True))
    b = run_inprocess(tiny_args("--train-iters", 3, "--load", init, "--init-method-std", 0.5, mock=True))
    assert losses(a) == losses(b)  # weights come from the checkpoint, not from the init flags


def test_an_empty_load_directory_or_load_equal_to_save_starts_fresh_with_a_notice(tmp_path, capsys):
    ctx = run_inprocess(tiny_args("--train-iters", 3, "--load", tmp_path, mock=True))  # exists, empty
    assert ctx.history[0]["iteration"] == 1
    assert f"--load {tmp_path} holds no checkpoint" in capsys.readouterr().out
    run_dir = tmp_path / "run"  # a job that resumes where it saves: the first submission
    ctx = run_inprocess(tiny_args("--train-iters", 3, "--load", run_dir, "--save", run_dir, mock=True))
    assert ctx.history[0]["iteration"] == 1
    assert f"--load {run_dir} does not exist yet (it is also --save): starting from scratch" in capsys.readouterr().out


def test_a_load_directory_that_does_not_exist_is_refused(tmp_path, capsys):
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--load", tmp_path / "typo", mock=True))
    assert f"--load {tmp_path / 'typo'}: no such directory" in line


def test_crash_while_resaving_an_iteration_falls_back_to_the_previous_copy(tmp_path):
    import argparse

    run_inprocess(tiny_args("--train-iters", 2, "--save", tmp_path, "--lr-warmup-iters", 1, mock=True))
    os.rename(tmp_path / "iter_0000002", tmp_path / "iter_0000002.old")  # crash between the renames
    args = argparse.Namespace(load=str(tmp_path), ckpt_step=None, exit_on_missing_checkpoint=False)
    assert checkpointing.find_checkpoint(args) == (str(tmp_path / "iter_0000002.old"), 2)
    resumed = run_inprocess(tiny_args("--train-iters", 3, "--load", tmp_path, "--lr-warmup-iters", 1,
                                      "--override-opt_param-scheduler", mock=True))
    assert [h["iteration"] for h in resumed.history] == [3]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (a real filesystem that fills up); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full test skipped")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


class _FillDisk(Callback):
    """Fills the disk after iteration 3, between the save of iteration 2 and that of 4."""

    def __init__(self, disk):
        self.disk = disk

    def on_step_end(self, state):
        if state.iteration == 3:
            with open(self.disk / "filler", "wb") as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(1 << 16))


def test_a_full_disk_is_named_and_the_last_good_checkpoint_stays(small_disk, capsys):
    from megatron_patch.training.pretrain import main

    save = small_disk / "ckpt"
    code = main([str(a) for a in tiny_args("--train-iters", 4, "--save", save, "--save-interval", 2, mock=True)],
                callbacks=[_FillDisk(small_disk)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "no space left on device (ENOSPC) writing " + str(save / "iter_0000004.tmp") in err[0]
    assert "the last good checkpoint is iteration 2 (still published)" in err[0]
    assert sorted(os.listdir(save)) == ["iter_0000002", checkpointing.TRACKER]
    assert (save / checkpointing.TRACKER).read_text() == "2"
    os.remove(small_disk / "filler")  # space again: the run resumes from 2
    resumed = run_inprocess(tiny_args("--train-iters", 4, "--load", save, "--save", save, mock=True))
    assert [h["iteration"] for h in resumed.history] == [3, 4]
