"""Mistakes users make every week, each refused in one line before anything is lost: a resume with
other model flags, a fresh run over a saved run, two trainers on one --save, settings that make
no sense, a diverging run, a changed schedule; and the clean-up of a crashed save."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megatron_patch.training import save_dir
from megatron_patch.training.callbacks import Callback
from tests.train_helpers import ROOT, make_corpus, one_error_line, run_inprocess, subprocess_env, tiny_args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("safety") / "data" / "tiny_text_document")


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """A 4-iteration run (tied embeddings) saved at iteration 4."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    run_inprocess(tiny_args("--train-iters", 8, "--save", root, "--exit-interval", 4, data=corpus))
    return root


@pytest.mark.parametrize("extra, named", [
    (["--untie-embeddings-and-output-weights"], "--untie-embeddings-and-output-weights: checkpoint not given, "
                                                "this run given"),
    (["--scaled-embed"], "--scaled-embed: checkpoint not given, this run given"),
    (["--num-attention-heads", 8], "--num-attention-heads: checkpoint 4, this run 8"),
    (["--position-embedding-type", "rope"], "--position-embedding-type: checkpoint learned_absolute, this run rope"),
    (["--normalization", "RMSNorm", "--swiglu"], "--normalization: checkpoint LayerNorm, this run RMSNorm; "
                                                 "--swiglu: checkpoint not given, this run given"),
])
def test_resume_with_other_model_flags_is_refused_naming_each(corpus, saved, capsys, extra, named):
    line = one_error_line(capsys, tiny_args("--train-iters", 8, "--load", saved, *extra, data=corpus))
    assert named in line and "resume with the checkpoint's values" in line


def test_flags_free_on_resume_still_resume(corpus, saved):
    ctx = run_inprocess(tiny_args("--train-iters", 8, "--load", saved, "--init-method-std", 0.5,
                                  "--log-interval", 2, "--override-opt_param-scheduler", "--lr", 1e-3, data=corpus))
    assert [h["iteration"] for h in ctx.history] == [5, 6, 7, 8]


def test_a_resume_with_another_seed_says_the_data_order_changes(corpus, saved, capsys):
    run_inprocess(tiny_args("--train-iters", 8, "--load", saved, "--seed", 5, data=corpus))
    assert "--seed 5 differs from the checkpoint's 1234: the data order is reshuffled" in capsys.readouterr().out


def test_a_fresh_run_does_not_overwrite_a_saved_run(corpus, saved, capsys):
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--save", saved, data=corpus))
    assert "already holds a run (latest checkpoint: iteration 4)" in line and "--overwrite-checkpoints" in line
    assert (saved / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_overwrite_checkpoints_lets_a_fresh_run_replace_it(corpus, tmp_path):
    run_inprocess(tiny_args("--train-iters", 4, "--save", tmp_path, data=corpus))
    run_inprocess(tiny_args("--train-iters", 3, "--save", tmp_path, "--overwrite-checkpoints", data=corpus))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"


def test_a_second_trainer_on_the_same_save_is_refused(corpus, tmp_path, capsys):
    (tmp_path / save_dir.LOCK).write_text(f"{socket.gethostname()} {os.getppid()}\n")  # a live process
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--save", tmp_path, data=corpus))
    assert f"is in use by another trainer ({socket.gethostname()} pid {os.getppid()}" in line


def test_the_lock_of_a_dead_trainer_is_taken_over_and_stale_saves_cleaned(corpus, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / save_dir.LOCK).write_text(f"{socket.gethostname()} {dead.pid}\n")
    (tmp_path / "iter_0000007.tmp").mkdir()  # left by a crash inside a save
    run_inprocess(tiny_args("--train-iters", 3, "--save", tmp_path, data=corpus))
    assert f"took over the lock of a trainer that is gone ({socket.gethostname()} pid {dead.pid})" in \
        capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]  # lock released


def test_save_under_a_file_fails_at_start_up(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--save", tmp_path / "file" / "run", data=corpus))
    assert "cannot be created" in line


@pytest.mark.parametrize("extra, named", [
    (["--clip-grad", -1], "--clip-grad -1.0: must be >= 0"),
    (["--num-workers", -1], "--num-workers -1: must be >= 0"),
    (["--split", "100,0,0", "--eval-iters", 5], "leaves no validation data, but --eval-iters 5"),
    (["--split", "a,b,c"], "--split 'a,b,c': expected up to three numbers"),
    (["--num-layers", 0], "--num-layers 0: must be >= 1"),
    (["--global-batch-size", 0], "--global-batch-size 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", -1], "--lr -1.0: must lie in [0, inf)"),
    (["--adam-beta2", 1], "--adam-beta2 1.0: must lie in [0, 1)"),
    (["--hidden-dropout", 1.5], "--hidden-dropout 1.5: must lie in [0, 1]"),
    (["--spike-zscore", "nan"], "--spike-zscore nan: must be a finite number"),
    (["--group-query-attention", "--num-query-groups", 3], "--num-query-groups 3 does not divide "
                                                           "--num-attention-heads 4"),
])
def test_settings_that_make_no_sense_are_refused(corpus, capsys, extra, named):
    assert named in one_error_line(capsys, tiny_args("--train-iters", 3, *extra, data=corpus))


@pytest.mark.parametrize("weight, named", [("-0.5", "blend weight -0.5 is negative"),
                                           ("0", "blend weight 0 for "), ("nan", "blend weight nan is not a finite"),
                                           ("inf", "blend weight inf is not a finite")])
def test_bad_blend_weights_are_refused(corpus, capsys, weight, named):
    argv = tiny_args("--train-iters", 3, data=corpus)
    argv[argv.index("--data-path") + 1:argv.index("--data-path") + 2] = ["0.5", str(corpus), weight, str(corpus)]
    assert named in one_error_line(capsys, argv)


def test_per_split_paths_without_validation_data_are_refused_when_evaluating(corpus, capsys):
    argv = [a for a in tiny_args("--train-iters", 3, "--eval-iters", 2, data=corpus)]
    i = argv.index("--data-path")
    argv[i:i + 4] = ["--train-data-path", str(corpus)]
    assert ("--eval-iters 2 asks for validation data, but only --train-data-path is given"
            in one_error_line(capsys, argv))


def test_exit_signal_handler_without_save_is_warned(corpus, capsys):
    run_inprocess(tiny_args("--train-iters", 3, "--exit-signal-handler", data=corpus))
    assert "--exit-signal-handler without --save" in capsys.readouterr().out


def test_a_diverging_run_reports_its_iteration_in_one_line(corpus, capsys):
    line = one_error_line(capsys, tiny_args("--train-iters", 10, "--lr", 1e6, "--clip-grad", 0,
                                            "--lr-warmup-iters", 0, data=corpus))
    assert "megatron-core found non-finite gradients" in line and "iteration -1" not in line
    assert line.split("error: iteration ")[1].split(":")[0].isdigit()


def test_a_changed_schedule_on_resume_says_how_to_proceed(corpus, saved, capsys):
    line = one_error_line(capsys, tiny_args("--train-iters", 12, "--load", saved, data=corpus))
    assert "lr schedule differs from the checkpoint's" in line and "--override-opt_param-scheduler" in line


@pytest.mark.parametrize("damage, named", [
    ("metadata", "its .metadata or common state is truncated or corrupt"),
    ("distcp", "a tensor file (.distcp) ended early: truncated"),
])
def test_a_damaged_checkpoint_is_named_with_the_earlier_ones(corpus, tmp_path, capsys, damage, named):
    root = tmp_path / "ckpt"
    run_inprocess(tiny_args("--train-iters", 4, "--save", root, "--save-interval", 2, data=corpus))
    target = root / "iter_0000004" / ".metadata" if damage == "metadata" else \
        sorted((root / "iter_0000004").glob("*.distcp"))[0]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    line = one_error_line(capsys, tiny_args("--train-iters", 6, "--load", root, data=corpus))
    assert named in line and "earlier checkpoints: 2 (resume one with --ckpt-step N)" in line


def test_a_shape_that_differs_is_named_with_the_flag(corpus, saved, capsys):
    from megatron_patch.export import megatron_io
    from megatron_patch.training.errors import SetupError

    # The trainer compares flags first; the loader itself (evaluate, export) names the tensor.
    _, common = megatron_io.read_common(str(saved))
    args = megatron_io.args_from_saved({**common["args"], "ffn_hidden_size": 96})
    megatron_io.start_single_process(args)
    try:
        model = megatron_io.build_model(args, common["padded_vocab_size"])
        from megatron_patch.training import checkpoint_keys

        path, _ = megatron_io.read_common(str(saved))
        with pytest.raises(SetupError, match=r"decoder.layers.mlp.linear_fc1.weight is \(2, 256, 64\) in the "
                                             r"checkpoint, \(2, 96, 64\) here \(check --ffn-hidden-size"):
            checkpoint_keys.load_sharded({"model0": model.sharded_state_dict()}, path)
    finally:
        megatron_io.stop()


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(corpus, tmp_path, capsys, monkeypatch):
    """A job requeued after a hard kill may start on another node; it keeps its SLURM_JOB_ID."""
    (tmp_path / save_dir.LOCK).write_text("node017 12345 4242\n")  # another host: cannot be checked
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--save", tmp_path, data=corpus))
    assert "is in use by another trainer (node017 pid 12345" in line
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_inprocess(tiny_args("--train-iters", 3, "--save", tmp_path, data=corpus))
    assert "took over the lock of an earlier run of Slurm job 4242 (node017 pid 12345)" in capsys.readouterr().out


@pytest.mark.parametrize("num_docs", [40, 400])  # fewer documents: IndexError; more: silently stale samples
def test_data_remade_under_the_same_prefix_gets_new_indices_on_resume(tmp_path, num_docs):
    prefix = make_corpus(tmp_path / "data" / "text_document", num_docs=200)
    run_inprocess(tiny_args("--train-iters", 6, "--save", tmp_path / "ckpt", "--exit-interval", 3, data=prefix))
    make_corpus(prefix, num_docs=num_docs, seed=7)  # preprocess_data.py again, into the same prefix
    resumed = run_inprocess(tiny_args("--train-iters", 6, "--load", tmp_path / "ckpt", data=prefix))
    assert [h["iteration"] for h in resumed.history] == [4, 5, 6]
    train = resumed.datasets[0]
    assert int(train.document_index.max()) + 1 == round(0.9 * num_docs)  # every training document of the new data


class _CtrlC(Callback):
    """Sends this process SIGINT, as Ctrl-C does, at iteration 2: after the step or inside evaluation."""

    def __init__(self, when):
        self.when = when

    def on_step_end(self, state):
        if self.when == "step" and state.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)

    def on_eval_end(self, state, metrics):
        if self.when == "evaluation" and state.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("when", ["step", "evaluation"])
def test_ctrl_c_with_the_exit_signal_handler_saves_and_stops(corpus, tmp_path, when):
    ctx = run_inprocess(tiny_args("--train-iters", 6, "--save", tmp_path, "--exit-signal-handler", "--eval-iters", 1,
                                  "--eval-interval", 2, data=corpus), callbacks=[_CtrlC(when)])
    assert ctx.stop_reason == "signal" and [h["iteration"] for h in ctx.history] == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("when", ["save", "evaluation"])
def test_ctrl_c_without_the_handler_stops_in_one_line_and_leaves_no_tmp(corpus, tmp_path, capsys, monkeypatch, when):
    # A shell's background job (CI) starts with SIGINT ignored, and Python then installs no Ctrl-C
    # handler: give the process the one an interactive user's has.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from megatron.core import dist_checkpointing

    from megatron_patch.training.pretrain import main

    real_save = dist_checkpointing.save

    def interrupted_save(sd, directory, **kw):
        if directory.endswith("iter_0000004.tmp"):  # Ctrl-C half-way through writing it
            open(os.path.join(directory, "__0_0.distcp"), "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(sd, directory, **kw)

    monkeypatch.setattr(dist_checkpointing, "save", interrupted_save)
    argv = tiny_args("--train-iters", 6, "--save", tmp_path, "--save-interval", 2, "--eval-iters", 1,
                     "--eval-interval", 4, data=corpus)
    code = main([str(a) for a in argv], callbacks=[_CtrlC("evaluation")] if when == "evaluation" else [])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("pretrain_gpt.py: interrupted (Ctrl-C): "), err
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


def _maps(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pretrain_gpt.py", "tools/convert_checkpoint.py"])
def test_ctrl_c_at_start_up_is_one_line(tmp_path, script):
    """Ctrl-C while torch is being imported (at the top of pretrain_gpt.py; in main() of the tools,
    as in tools/evaluate.py): sent once libtorch is mapped into the process."""
    args = {"pretrain_gpt.py": ["--help"],
            "tools/convert_checkpoint.py": ["--load", tmp_path, "--output", tmp_path / "hf", "--to", "hf"]}[script]
    proc = subprocess.Popen([sys.executable, str(ROOT / script)] + [str(a) for a in args], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and "libtorch" not in _maps(proc.pid):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    name = os.path.basename(script)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, (proc.returncode, err[-2000:])
    assert err.startswith(f"{name}: interrupted (Ctrl-C)"), err


@pytest.mark.parametrize("flag", ["--tensorboard-dir", "--wandb-save-dir", "--monitor-dir"])
def test_output_directories_are_checked_at_start_up_as_save_is(corpus, tmp_path, capsys, flag):
    (tmp_path / "file").write_text("x")
    line = one_error_line(capsys, tiny_args("--train-iters", 3, flag, tmp_path / "file" / "out", data=corpus))
    assert f"{flag} {tmp_path / 'file' / 'out'} lies under the file {tmp_path / 'file'}; give a directory" in line


def test_evaluate_refuses_an_output_json_that_is_a_directory(corpus, tmp_path, capsys):
    from tools import evaluate

    assert evaluate.main(["--load", str(tmp_path), "--data-path", str(corpus), "--output-json", str(tmp_path)]) == 1
    assert f"--output-json {tmp_path} is a directory" in capsys.readouterr().err


def test_evaluate_refuses_data_made_with_another_tokenizer_of_the_same_size(corpus, saved, tmp_path, capsys):
    """The checkpoint records its tokenizer's identity; data made with another tokenizer of the same
    size (another type or other files) would be scored as if it were the run's."""
    import json

    from megatron.core import dist_checkpointing

    from tools import evaluate

    common = dist_checkpointing.load_common_state_dict(str(saved / "iter_0000004"))
    assert common["tokenizer_identity"] == {"tokenizer_type": "NullTokenizer", "vocab_size": 201, "files_sha256": {}}
    other = make_corpus(tmp_path / "other" / "text_document", num_docs=20)
    with open(other + ".tokenizer.json", "w") as f:
        json.dump({"tokenizer_type": "SentencePieceTokenizer", "vocab_size": 201,
                   "files_sha256": {"tokenizer_model": "0" * 64}}, f)
    assert evaluate.main(["--load", str(saved), "--data-path", other]) == 1
    err = capsys.readouterr().err
    assert f"the tokenizer {other} was made with differs from the tokenizer the checkpoint was trained with " \
           "(the checkpoint's vs this: type NullTokenizer vs SentencePieceTokenizer)" in err, err


def test_export_never_deletes_files_it_did_not_write(saved, tmp_path):
    from megatron_patch.export import ExportError
    from megatron_patch.export.convert import export_to_hf

    out = tmp_path / "hf"
    export_to_hf(str(saved), str(out))
    before = sorted(os.listdir(out))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds files this export does not write \(notes.txt\)"):
        export_to_hf(str(saved), str(out))
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == sorted(before + ["notes.txt"])
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary left
    os.remove(out / "notes.txt")
    export_to_hf(str(saved), str(out))  # an earlier export alone is replaced
