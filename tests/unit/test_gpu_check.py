"""The GPU check without a GPU: what it reports on a machine without CUDA (exit 3, nothing
measured), the flags its parts hand the trainer, the carry folder for the lent GPU machine, and
(lane 50-gpu-rehearsal) the rehearsal: the prepared command run verbatim against a Python 3.12
venv holding only that machine's packages."""

import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

from megatron_patch import capabilities
from tests.gpu import check, prepare_carry
from tests.train_helpers import ROOT, pretrain_cmd, subprocess_env, tiny_args

NO_GPU = capabilities.Capabilities(cuda=False, transformer_engine=False, apex=False, fused_wgrad=False,
                                   masked_softmax=False)
H100 = {"name": "NVIDIA H100 80GB HBM3", "count": 1, "memory_gib": 79.2, "capability": "sm_90",
        "peak_bf16_tflops": 989.0}


# ---------------------------------------------------------------- no CUDA device
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")
def test_without_cuda_nothing_is_measured_and_the_exit_status_says_so(tmp_path):
    proc = subprocess.run(["bash", "tests/gpu/run.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(subprocess_env(), PYTHON=sys.executable))
    assert proc.returncode == check.EXIT_NO_CUDA, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cuda"] is False and summary["device"] is None and list(summary["parts"]) == list(check.PARTS)
    assert all(part == {"ok": False, "not_run": "no CUDA device"} for part in summary["parts"].values())
    assert proc.stdout.count("not run: no CUDA device") == len(check.PARTS)
    assert (tmp_path / "summary.txt").read_text().splitlines()[0] == "GPU check: no CUDA device"


def test_script_refuses_an_interpreter_without_megatron_core(tmp_path):
    proc = subprocess.run(["bash", "tests/gpu/run.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(subprocess_env(), PYTHON="/bin/false"))
    assert proc.returncode == check.EXIT_BROKEN and "lacks megatron-core" in proc.stderr


def test_a_missing_package_is_reported_as_a_broken_environment(tmp_path, monkeypatch):
    def no_megatron():
        raise ImportError("No module named 'megatron'")

    monkeypatch.setattr(check, "environment", no_megatron)
    assert check.main([str(tmp_path)]) == check.EXIT_BROKEN
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["environment_error"] == "ImportError: No module named 'megatron'" and "parts" not in summary


# ---------------------------------------------------------------- what the parts run
def test_figures_are_read_from_the_trainers_log_line():
    proc = subprocess.run(pretrain_cmd(tiny_args("--train-iters", 4, "--fp16", "--peak-tflops", 1.0, mock=True)),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = check.last_log_line(proc.stdout)
    assert set(figures) >= {"tokens_per_s", "tflops", "mfu_percent", "ms_per_iter", "loss_scale", "skipped",
                            "memory_mib"}
    assert figures["tokens_per_s"] > 0 and figures["loss_scale"] < 2.0 ** 32
    assert figures["mfu_percent"] == pytest.approx(100 * figures["tflops"], rel=1e-2, abs=1e-2)


class RecordingRunner:
    """Stands in for check.Runner: records the trainer flags, answers with `results` in turn."""

    def __init__(self, tmp_path, results):
        self.work = self.logs = tmp_path
        self.results, self.argvs = list(results), []

    def pretrain(self, argv, name, timeout):
        self.argvs.append([str(a) for a in argv])
        (self.logs / f"{name}.log").write_text(" 355,919,872 parameters on rank 0;")
        return self.results.pop(0)


def test_throughput_trains_the_350m_paper_config_in_bf16_on_local_layers_without_te(tmp_path):
    from megatron_patch.training.arguments import parse_and_validate

    runner = RecordingRunner(tmp_path, [{"ok": True, "tokens_per_s": 1.0}])
    result = check.throughput(runner, check.Shapes(on_gpu=True, quick=False), "local", H100)
    with capabilities.use(NO_GPU):
        args = parse_and_validate(runner.argvs[0])
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (24, 1024, 16, 2048)
    assert args.bf16 and args.transformer_impl == "local" and args.peak_tflops == 989.0
    assert (args.micro_batch_size, args.global_batch_size, args.train_iters) == (4, 16, 30)
    assert args.small_init and args.hidden_dropout == 0.1  # the paper's, not the check's
    assert result["parameters"] == 355919872 and result["figures_over_last_iterations"] == 15


def test_throughput_halves_the_micro_batch_after_running_out_of_memory(tmp_path):
    oom = {"ok": False, "error": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    runner = RecordingRunner(tmp_path, [oom, {"ok": True}])
    result = check.throughput(runner, check.Shapes(on_gpu=True, quick=True), "local", H100)
    micro = [argv[argv.index("--micro-batch-size", len(argv) - 2) + 1] for argv in runner.argvs]
    assert micro == ["4", "2"] and result["ok"] and result["micro_batch"] == 2


def test_step_time_compares_the_methods_with_their_paper_flags():
    assert check.METHODS == ("vanilla", "scaled_embed", "embed_ln", "wesar")
    assert check._method_flags("vanilla") == [] and "--scaled-embed" in check._method_flags("scaled_embed")
    assert "--embed-layernorm" in check._method_flags("embed_ln") and "--wesar" in check._method_flags("wesar")


def test_what_cannot_run_is_listed_with_its_reason():
    listed = check.not_run(NO_GPU, H100)
    assert any("Transformer Engine" in what and "cannot be" in why for what, why in listed.items())
    assert any("apex" in what for what in listed)
    assert any("across GPUs" in what and why.startswith("1 CUDA device") for what, why in listed.items())
    with_te = capabilities.Capabilities(cuda=True, transformer_engine=True, apex=True, fused_wgrad=True,
                                        masked_softmax=True, arch_major=9)
    assert not any("Transformer Engine" in what or "apex" in what for what in check.not_run(with_te, H100))
    assert capabilities.default_transformer_impl(with_te) == "transformer_engine"
    assert capabilities.default_transformer_impl(dataclass_replace(with_te, transformer_engine=False)) == "local"


def dataclass_replace(caps, **changes):
    import dataclasses

    return dataclasses.replace(caps, **changes)


def test_summary_names_failures_figures_and_what_did_not_run(tmp_path):
    summary = {"device": H100, "cuda": True, "layers": "local", "not_run": {"apex kernels": "apex is not installed"},
               "parts": {"throughput": {"ok": True, "tokens_per_s": 12345.6, "mfu_percent": 41.26},
                         "fp16_scaler": {"ok": False, "error": "boom"},
                         "step_time": {"ok": True, "time_ratios": {"wesar / vanilla": 1.02}},
                         "export": {"ok": False, "not_run": "the 450 s budget was spent"}}}
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "throughput_mbs4.log").write_text("log")
    check.write_summary(tmp_path, summary, tmp_path)
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert lines[0] == "GPU check: NVIDIA H100 80GB HBM3 (79.2 GiB)" and lines[1] == "  layers: local"
    assert lines[2] == "  throughput   ok   tokens_per_s=1.235e+04, mfu_percent=41.26"
    assert lines[3] == "  fp16_scaler  FAIL error=boom"
    assert lines[4] == "  step_time    ok   time_ratios={wesar / vanilla: 1.02}"
    assert lines[5] == "  export       not run: the 450 s budget was spent"
    assert lines[6:] == ["  not run here:", "    apex kernels: apex is not installed"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert tar.getnames() == ["logs", "logs/throughput_mbs4.log"]


# ---------------------------------------------------------------- the carry folder
def fake_wheel(tmp_path, name, version, requires=()):
    path = tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\nlong description\nRequires-Dist: not-a-header\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_carry_check_accepts_wheels_whose_needs_the_machine_meets(tmp_path):
    machine = prepare_carry.machine_packages()
    wheels = [fake_wheel(tmp_path, "megatron-core", "0.16.1", ["torch", "numpy<2.6", "packaging",
                                                                "flask; extra == 'dev'"]),
              fake_wheel(tmp_path, "pytest", "9.2.0", ["iniconfig>=1", "pluggy<2,>=1.5", "packaging>=20",
                                                        "pygments>=2.7.2", "colorama>=0.4; sys_platform == 'win32'",
                                                        "exceptiongroup>=1; python_version < '3.11'"]),
              fake_wheel(tmp_path, "pytest_timeout", "2.4.0", ["pytest>=7.0.0"])]
    assert prepare_carry.check_carry(wheels, machine, ["megatron-core==0.16.1", "pytest==9.2.0"]) == []


def test_carry_check_names_every_problem(tmp_path):
    machine = prepare_carry.machine_packages()
    wheels = [fake_wheel(tmp_path, "megatron-core", "0.19.2", []),
              fake_wheel(tmp_path, "Megatron_Core", "0.16.1", ["torch", "nvidia-modelopt"]),
              fake_wheel(tmp_path, "transformers", "5.24.0", [])]
    problems = prepare_carry.check_carry(wheels, machine, ["megatron-core>=0.16.1,<0.20", "pytest==9.2.0"])
    assert problems == [
        "Megatron_Core-0.16.1-py3-none-any.whl: a second version of megatron-core (pip refuses two)",
        "transformers-5.24.0-py3-none-any.whl: the machine already has transformers==5.17.0; carry none",
        "megatron-core needs nvidia-modelopt: neither on the machine nor carried",
        "pytest==9.2.0: not carried (found none); run tests/gpu/prepare_carry.py"]


def test_megatron_core_version_comes_from_setup_py(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text('install_requires=[\n    "megatron-core>=0.16.1, <0.20",\n    "torch>=2.4,<3",\n]')
    assert prepare_carry.megatron_core_requirement(setup) == "megatron-core>=0.16.1,<0.20"
    assert prepare_carry.megatron_core_requirement().startswith("megatron-core")  # this checkout's


def test_machine_list_holds_the_machines_packages_and_not_what_is_carried():
    machine = prepare_carry.machine_packages()
    assert machine["torch"] == "torch==2.11.0" and machine["transformers"] == "transformers==5.17.0"
    assert {"numpy", "packaging", "sentencepiece", "psutil", "pluggy", "iniconfig"} <= set(machine)
    assert not {"megatron-core", "pytest", "transformer-engine", "apex", "deepspeed"} & set(machine)


def test_prepared_command_fits_the_lent_machine():
    cmd = prepare_carry.command()
    assert len(cmd) <= prepare_carry.COMMAND_LIMIT
    assert "--no-index --no-deps" in cmd and f"{prepare_carry.CARRY}/*.whl" in cmd
    assert 'python3 tests/gpu/check.py "$OUT"' in cmd and "set -o pipefail" in cmd
    assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0


# ---------------------------------------------------------------- the rehearsal (lane 50)
@pytest.mark.timeout(3600)  # ~3 min; more where other work shares the CPU (the check scales its timeouts)
def test_rehearsal_prepared_command_fails_only_for_want_of_a_gpu(tmp_path):
    """The printed command, verbatim, with the rehearsal venv's python3 first on PATH."""
    py = os.environ.get("GPU_MACHINE_PYTHON")
    if not py:
        pytest.skip("no venv of the GPU machine's packages: GPU_MACHINE_PYTHON (lane 50-gpu-rehearsal sets it)")
    assert os.access(py, os.X_OK), f"GPU_MACHINE_PYTHON={py} is not a Python (bash .ci/prepare/py312-gpu-machine.sh)"
    bare = subprocess.run([py, "-c", "import megatron.core"], capture_output=True, text=True)
    assert bare.returncode and "No module named 'megatron'" in bare.stderr  # the wheels must bring it
    checked = subprocess.run([sys.executable, "tests/gpu/prepare_carry.py", "--check"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    cmd = checked.stdout.strip()
    assert cmd == prepare_carry.command()
    env = {"PATH": f"{os.path.dirname(py)}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "OMP_NUM_THREADS": "2", "GPU_CHECK_SITE": str(tmp_path / "site")}

    def run(out, **extra):
        proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                              env=dict(env, OUT=str(out), **extra))
        return proc, json.loads((out / "summary.json").read_text())

    proc, summary = run(tmp_path / "plain")
    assert proc.returncode == check.EXIT_NO_CUDA, proc.stdout[-3000:] + proc.stderr[-3000:]
    env_found = summary["environment"]
    assert env_found["python"].startswith("3.12.") and env_found["torch"].startswith("2.11.0")
    assert env_found["megatron.core from"] == str(tmp_path / "site")
    assert set(summary["parts"]) == set(check.PARTS) and summary["cuda"] is False
    assert all(p["not_run"] == "no CUDA device" for p in summary["parts"].values())

    proc, summary = run(tmp_path / "cpu", GPU_CHECK_CPU_REHEARSAL="1")
    assert proc.returncode == check.EXIT_NO_CUDA, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["cpu_rehearsal"] is True and summary["layers"] == "local"
    failed = {name: p for name, p in summary["parts"].items() if not p["ok"]}
    assert not failed, failed
    assert summary["parts"]["fp16_scaler"]["settled"] and summary["parts"]["export"]["max_abs_logit_diff"] < 1e-3
    assert sorted(os.listdir(tmp_path / "cpu")) == ["console.log", "install.log", "logs.tar.gz", "summary.json",
                                                    "summary.txt"]  # the lent machine returns at most 8 files
