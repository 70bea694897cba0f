"""megatron-core 0.19.x (this interpreter) against 0.16.1 (the interpreter named by
MEGATRON_PATCH_REFERENCE_PYTHON, lane 10's Python 3.11 .venv): the same model options train to
the same losses, a 0.16.1 checkpoint resumes here, and 0.16.1 refuses a 0.19 checkpoint in one
line naming both releases. Run by .ci/lanes/20-py312.sh (collected only when the variable is set;
see tests/conftest.py).

Why the 3.11 venv as the reference rather than 0.16.1 installed on 3.12: it is what this
package's users have run and written checkpoints with (0.16.1 is the newest release on 3.11), it
is already there after lane 10, and it is the other CI lane's own environment, so the figures
compared are that lane's. The two sides differ in Python and torch build as well as in
megatron-core (torch 2.13.0 CPU there, 2.14.1 CUDA build on CPU here).
"""

import json
import os
import subprocess

import pytest
from packaging.version import Version

from megatron_patch import upstream
from tests.cross_version import reference as ref
from tests.train_helpers import ROOT, pretrain_cmd, run_inprocess, subprocess_env, tiny_args

LOSS_TOLERANCE = 1e-5  # the two sides run different torch builds; measured difference: see below
REFERENCE_PYTHON = os.environ.get("MEGATRON_PATCH_REFERENCE_PYTHON")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_0_16_1")
    proc = subprocess.run([REFERENCE_PYTHON, "-m", "tests.cross_version.reference", str(out)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((out / "reference.json").read_text())
    assert result["megatron_core"] == "0.16.1", result["megatron_core"]
    assert upstream.VERSION >= Version("0.19"), upstream.VERSION
    return out, result["runs"]


def _column(history, key):
    return [h[key] for h in history]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ref.CONFIGS))
def test_option_losses_equal_the_0_16_1_run(reference, name):
    out, runs = reference
    mine, theirs = run_inprocess(ref.config_argv(name, ref.corpus_prefix(out))).history, runs[name]
    assert len(mine) == len(theirs) == ref.ITERS
    assert _column(mine, "skipped") == _column(theirs, "skipped")
    assert _column(mine, "loss_scale") == _column(theirs, "loss_scale")
    deltas = [abs(a - b) for a, b in zip(_column(mine, "loss"), _column(theirs, "loss"))]
    assert max(deltas) <= LOSS_TOLERANCE, deltas


@pytest.fixture(scope="module")
def resumed(reference, tmp_path_factory):
    """0.19 resumes the 0.16.1 run's checkpoint at SAVE_AT and trains to the end (saving there)."""
    out, runs = reference
    save = tmp_path_factory.mktemp("resumed_0_19")
    argv = ref.resume_argv(ref.corpus_prefix(out), save, "--load", out / "ckpt", "--ckpt-step", ref.SAVE_AT)
    return run_inprocess(argv).history, runs["resume_source"], save


@pytest.mark.slow
def test_a_0_16_1_checkpoint_resumes_bit_exact(resumed):
    """The steps after the checkpoint equal those 0.16.1 took after saving it, bit for bit. The
    reported gradient norm alone is summed in another order by 0.19 (measured: 1e-7 relative);
    the clipped update it scales is the same, as the equal losses show."""
    mine, theirs, _ = resumed
    theirs = theirs[ref.SAVE_AT:]
    keys = ("iteration", "loss", "lr", "loss_scale", "skipped")
    assert [[h[k] for k in keys] for h in mine] == [[h[k] for k in keys] for h in theirs]
    assert _column(mine, "grad_norm") == pytest.approx(_column(theirs, "grad_norm"), rel=1e-6)


@pytest.mark.slow
def test_evaluate_and_export_read_a_0_16_1_checkpoint(reference):
    from megatron_patch.export import megatron_io

    out, _ = reference
    assert upstream.common_state_location(str(out / "ckpt" / "iter_0000005")) == "common.pt"
    with megatron_io.loaded_checkpoint(str(out / "ckpt"), step=ref.SAVE_AT) as (model, args, common):
        assert common["iteration"] == ref.SAVE_AT and args.wesar
        assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_0_16_1_refuses_a_0_19_checkpoint_in_one_line(resumed, reference):
    _, _, save = resumed
    out, _ = reference
    assert upstream.common_state_location(str(save / f"iter_{ref.RESUME_ITERS:07d}")) == "torch_dist"
    argv = tiny_args("--train-iters", ref.RESUME_ITERS + 2, *ref.RESUME_FLAGS, "--load", save,
                     data=ref.corpus_prefix(out))
    proc = subprocess.run([REFERENCE_PYTHON] + pretrain_cmd(argv)[1:], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert f"megatron-core {upstream.VERSION}" in lines[0] and "megatron-core 0.16.1 (installed)" in lines[0], lines[0]
