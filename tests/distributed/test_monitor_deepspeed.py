"""The stability monitor on DeepSpeed's engine at DP=2 (torchrun, gloo), ZeRO stages 1-3: the
per-layer gradient norms read from each rank's ZeRO partition equal the Megatron engine's (rel
1e-5), injected spikes are skipped on every rank (Adam's fp32 partitions unchanged), and a
rollback reloads the engine's checkpoint and completes. One launch runs every case."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.train_helpers import ROOT, make_corpus, subprocess_env, tiny_args, torchrun_cmd, write_json

pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("monitor_worker.py")
INJECT = [12, 19]
STAGES = (1, 2, 3)
MONITOR = ["--monitor-interval", "5", "--spike-window", "32", "--spike-min-history", "6", "--spike-zscore", "6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor_deepspeed")
    data = make_corpus(tmp / "data" / "corpus")

    def argv(name, *extra):
        return [str(a) for a in tiny_args("--train-iters", 24, *MONITOR, "--monitor-dir", tmp / name, *extra,
                                          data=data)]

    spec = [{"case": "loss", "name": "megatron", "argv": argv("megatron", "--spike-policy", "skip"), "inject": INJECT}]
    for stage in STAGES:
        zero = ["--deepspeed", "--deepspeed-config", ROOT / f"examples/deepspeed/zero{stage}.json"]
        spec.append({"case": "loss", "name": f"zero{stage}",
                     "argv": argv(f"zero{stage}", "--spike-policy", "skip", *zero),
                     "inject": INJECT})
    spec.append({"case": "loss", "name": "zero1_rollback", "inject": [14, 15, 16], "argv": argv(
        "zero1_rollback", "--spike-policy", "rollback", "--rollback-after", 3, "--rollback-window", 10,
        "--save", tmp / "ckpt", "--save-interval", 4, "--deepspeed", "--deepspeed-config",
        ROOT / "examples/deepspeed/zero1.json")})
    for item in spec:
        item["out"] = str(tmp / f"{item['name']}.json")
    write_json(tmp / "spec.json", spec)
    proc = subprocess.run(torchrun_cmd(WORKER, ["--spec", tmp / "spec.json"]), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for item in spec:
        lines = [json.loads(line) for line in (tmp / item["name"] / "monitor.jsonl").read_text().splitlines()]
        results[item["name"]] = (json.loads(Path(item["out"]).read_text()), lines)
    return results


def changed(result, iteration):
    return [per_rank[str(iteration)] for per_rank in result["changed_per_rank"]]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_injected_spikes_are_skipped_on_every_rank(runs, stage):
    result, _ = runs[f"zero{stage}"]
    assert result["spikes"] == INJECT
    for it in INJECT:
        assert changed(result, it) == [False, False]
    assert changed(result, 13) == [True, True]
    assert [h["iteration"] for h in result["history"] if h["skip_reason"] == "monitor"] == INJECT


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_per_layer_norms_from_zero_partitions_equal_the_megatron_engines(runs, stage):
    _, zero = runs[f"zero{stage}"]
    _, megatron = runs["megatron"]
    assert [rec["iteration"] for rec in zero] == [rec["iteration"] for rec in megatron] == list(range(1, 25))
    for a, b in zip(zero, megatron):
        assert a["grad_norm_total"] == pytest.approx(b["grad_norm_total"], rel=1e-5)
        assert ("grad_norm" in a) == ("grad_norm" in b)
        for key, value in a.get("grad_norm", {}).items():
            assert value == pytest.approx(b["grad_norm"][key], rel=1e-5, abs=1e-12), (a["iteration"], key)


@pytest.mark.slow
def test_rollback_reloads_the_deepspeed_checkpoint_and_completes(runs):
    result, _ = runs["zero1_rollback"]
    assert result["rollbacks"] == [[16, 12]] and result["iteration"] == 24
