"""--deepspeed: ZeRO 0/1/2/3 (DP=2) and TP=2 + ZeRO-1 reproduce the Megatron engine's training and
validation losses and lr curve; resume is exact (after --exit-interval, and after a crash in the
middle of a save, which leaves the last good checkpoint in charge); bad configurations stop with
one line.

All runs share one torchrun launch (tests/distributed/deepspeed_worker.py). Same seed, so the
same initial weights; same data iterators; dropout off; 2 micro-batches per DP rank, so DeepSpeed
accumulates gradients. Tolerance: |delta loss| <= ATOL per iteration over 6 iterations (measured
max 4.8e-7, one float32 step at 5.4, training and validation: the engines sum and clip gradients
in a different order).
"""

import json
import subprocess

import pytest

from tests.train_helpers import ROOT, make_corpus, one_error_line, subprocess_env, tiny_args, torchrun_cmd, write_json

ATOL = 5e-6
ITERS = 6
EXAMPLES = ROOT / "examples" / "deepspeed"


def zero(stage, examples=EXAMPLES):
    return ["--deepspeed", "--deepspeed-config", examples / f"zero{stage}.json"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    corpus = make_corpus(tmp / "data" / "tiny_text_document")

    def base(*extra):
        return tiny_args("--train-iters", ITERS, "--micro-batch-size", 2, "--eval-interval", 3, "--eval-iters", 2,
                         *extra, data=corpus)

    tp2 = ["--tensor-model-parallel-size", 2]
    write_json(tmp / "zero0.json", {"zero_optimization": {"stage": 0}})  # DeepSpeed's plain data parallelism
    write_json(tmp / "bad_key.json", {"zero_optimization": {"stage": 1, "bogus_key": 1}})
    spec = [
        ("megatron_dp2", base("--save", tmp / "megatron")),
        ("zero0", base(*zero(0, tmp))),
        ("zero1", base(*zero(1))),
        ("zero2", base(*zero(2))),
        ("zero3", base(*zero(3))),
        ("megatron_tp2", base(*tp2)),
        ("tp2_zero1", base(*tp2, *zero(1))),
        ("zero3_stopped", base(*zero(3), "--save", tmp / "z3", "--save-interval", 3, "--exit-interval", 3)),
        ("zero3_resumed", base(*zero(3), "--load", tmp / "z3")),
        ("zero2_crashed", base(*zero(2), "--save", tmp / "z2", "--save-interval", 3), {"crash_on_save": ITERS}),
        ("zero2_after_crash", base(*zero(2), "--load", tmp / "z2")),
        ("megatron_loads_deepspeed", base("--load", tmp / "z3")),
        ("deepspeed_loads_megatron", base(*zero(1), "--load", tmp / "megatron")),
        ("zero2_loads_zero3", base(*zero(2), "--load", tmp / "z3")),
        ("veto_callback", base(*zero(1)), {"veto_callback": True}),
        ("unknown_json_key", base("--deepspeed", "--deepspeed-config", tmp / "bad_key.json")),
    ]
    write_json(tmp / "spec.json", [{"name": name, "argv": [str(a) for a in argv], **(opts[0] if opts else {})}
                                   for name, argv, *opts in spec])
    out = tmp / "out"
    out.mkdir()
    proc = subprocess.run(torchrun_cmd(ROOT / "tests/distributed/deepspeed_worker.py", [tmp / "spec.json", out]),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {}
    for name, *_ in spec:
        per_rank = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        assert per_rank[0].keys() == per_rank[1].keys()
        results[name] = per_rank[0]
        if "history" in per_rank[0]:
            assert per_rank[0]["history"] == per_rank[1]["history"]  # every rank logs the same
    return tmp, results


def losses(result):
    return [h["loss"] for h in result["history"]]


def close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= ATOL for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_matches_megatron_engine(runs, stage):
    _, got = runs
    ref, ds = got["megatron_dp2"], got[f"zero{stage}"]
    assert close(losses(ds), losses(ref)), (losses(ds), losses(ref))
    assert len(ref["eval"]) == 3 and close(ds["eval"], ref["eval"]), (ds["eval"], ref["eval"])  # valid 3, 6; test
    assert [h["lr"] for h in ds["history"]] == [h["lr"] for h in ref["history"]]
    assert ds["param_groups"] == ref["param_groups"]  # same weight-decay groups, same schedule
    assert not any(h["skipped"] for h in ds["history"])
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(ds["history"], ref["history"])]
    if stage == 0:  # DeepSpeed clips fp32 gradients without keeping the norm: none is logged
        assert all(a is None for a, _ in norms)
    else:
        assert all(abs(a - b) < 1e-4 for a, b in norms), norms


@pytest.mark.slow
def test_tensor_parallel_with_zero1_matches_megatron_engine(runs):
    _, got = runs
    ds, ref = got["tp2_zero1"], got["megatron_tp2"]
    assert close(losses(ds), losses(ref)) and close(ds["eval"], ref["eval"]), (ds, ref)


@pytest.mark.slow
def test_resume_after_exit_interval_is_exact(runs):
    _, got = runs
    assert len(got["zero3_stopped"]["history"]) == 3
    assert losses(got["zero3_resumed"]) == losses(got["zero3"])[3:]
    assert got["zero3_resumed"]["eval"] == got["zero3"]["eval"][1:]  # validation data position restored


@pytest.mark.slow
def test_crash_during_save_keeps_the_last_good_checkpoint(runs):
    tmp, got = runs
    assert "killed after writing iter_0000006.tmp" in got["zero2_crashed"]["crashed"]
    z2 = tmp / "z2"
    assert (z2 / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (z2 / "iter_0000006.tmp").is_dir() and not (z2 / "iter_0000006").exists()
    assert not (z2 / "latest").exists()  # DeepSpeed's own pointer is never written
    assert losses(got["zero2_after_crash"]) == losses(got["zero2"])[3:]


@pytest.mark.slow
def test_checkpoint_kinds_and_layouts_are_not_mixed(runs):
    _, got = runs
    assert "is a DeepSpeed checkpoint; resume it with --deepspeed" in got["megatron_loads_deepspeed"]["error"]
    assert "is not a DeepSpeed checkpoint" in got["deepspeed_loads_megatron"]["error"]
    assert "saved with ZeRO stage 3 at TP=1 DP=2, this run is ZeRO stage 2" in got["zero2_loads_zero3"]["error"]


@pytest.mark.slow
def test_a_callback_before_the_update_runs_on_the_engine_and_changes_nothing_unless_it_vetoes(runs):
    _, got = runs  # the monitor's skip itself: tests/distributed/test_monitor_deepspeed.py
    assert "error" not in got["veto_callback"]
    assert [h["loss"] for h in got["veto_callback"]["history"]] == [h["loss"] for h in got["zero1"]["history"]]


@pytest.mark.slow
def test_deepspeeds_own_config_errors_are_one_line(runs):
    _, got = runs
    error = got["unknown_json_key"]["error"]
    assert "\n" not in error and "bogus_key; Extra inputs are not permitted" in error, error


def ds_args(config, *extra):
    return tiny_args("--train-iters", 3, "--deepspeed", "--deepspeed-config", config, *extra, mock=True)


@pytest.mark.parametrize("config, extra, message", [
    ({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2}, [],
     "train_micro_batch_size_per_gpu is 2, but --micro-batch-size gives 4"),
    ({"gradient_accumulation_steps": 4}, [], "gradient_accumulation_steps is 4, but --global-batch-size"),
    ({"train_batch_size": 16}, [], "train_batch_size is 16, but --global-batch-size gives 8"),
    ({"gradient_clipping": 0.5}, [], "gradient_clipping is 0.5, but --clip-grad gives 1.0"),
    ({"bf16": {"enabled": True}}, [], "bf16.enabled is True, but --bf16 is not given"),
    ({"optimizer": {"type": "AdamW"}}, [], "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 4}}, [], "zero_optimization.stage must be 0, 1, 2 or 3"),
    ({}, ["--use-distributed-optimizer"], "--use-distributed-optimizer is not supported with --deepspeed"),
    ({"zero_optimization": {"stage": 3}}, ["--monitor-interval", 5, "--monitor-update-ratio"],
     "--monitor-update-ratio with ZeRO stage 3"),
    ([1, 2], [], "expected a JSON object, got list"),
])
def test_bad_configuration_is_one_line(tmp_path, capsys, config, extra, message):
    path = tmp_path / "ds.json"
    write_json(path, config)
    assert message in one_error_line(capsys, ds_args(path, *extra))


def test_pipeline_parallel_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group exists
    line = one_error_line(capsys, ds_args(EXAMPLES / "zero3.json", "--pipeline-model-parallel-size", 2))
    assert "--deepspeed with --pipeline-model-parallel-size 2: pipeline parallelism runs on the Megatron" in line


def test_missing_or_invalid_json(tmp_path, capsys):
    assert "no such file" in one_error_line(capsys, ds_args(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 1},}')
    assert ("not valid JSON (Expecting property name enclosed in double quotes at line 1, column 36)"
            in one_error_line(capsys, ds_args(tmp_path / "bad.json")))
    assert "--deepspeed needs --deepspeed-config" in one_error_line(
        capsys, tiny_args("--train-iters", 3, "--deepspeed", mock=True))


def test_json_is_completed_from_the_flags(tmp_path):
    from megatron_patch.training.arguments import parse_and_validate

    args = parse_and_validate([str(a) for a in ds_args(EXAMPLES / "zero2.json", "--micro-batch-size", 2)],
                              world_size=2)
    config = args.deepspeed_config_dict
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (2, 2, 8, 1.0)
    assert args.zero_stage == 2 and "fp16" not in config and "bf16" not in config



@pytest.mark.parametrize("config, message", [
    ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stage": "2"}}, "zero_optimization.stage must be a number (or \"auto\"), not \"2\""),
    ({"train_micro_batch_size_per_gpu": "4"}, "train_micro_batch_size_per_gpu must be a number"),
])
def test_misspelled_keys_and_string_numbers_are_refused(tmp_path, capsys, config, message):
    path = tmp_path / "ds.json"
    write_json(path, config)
    assert message in one_error_line(capsys, ds_args(path))


def test_every_shipped_config_passes_the_key_check():
    from megatron_patch.deepspeed.config import deepspeed_top_level_keys

    known = deepspeed_top_level_keys()
    for path in (ROOT / "examples" / "deepspeed").glob("*.json"):
        assert set(json.loads(path.read_text())) <= known, path
