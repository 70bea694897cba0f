"""tools/convert_checkpoint.py: trainer checkpoint -> transformers GPT2LMHeadModel or
LlamaForCausalLM -> checkpoint.

Each option that exports is trained for 3 steps (so biases, gates and tables are no longer at
init), exported, and loaded offline with from_pretrained; its logits must equal the megatron
model's (fp32, CPU). Import writes a trainer checkpoint; exporting that again gives the same
tensors bit for bit, and without folded options the imported checkpoint equals the original.
RoPE and GQA layouts are checked on a model whose attention is made sharp (tests/unit/test_llama_export.py).
"""

import json
import re
import subprocess

import pytest
import torch

pytest.importorskip("transformers")

from megatron_patch.export import ExportError, megatron_io  # noqa: E402
from megatron_patch.export.convert import export_to_hf, import_from_hf  # noqa: E402
from tests.train_helpers import ROOT, VOCAB, run_inprocess, subprocess_env, tiny_args  # noqa: E402

LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope"]
GQA = ["--group-query-attention", "--num-query-groups", "2"]
OPTIONS = {
    "vanilla": [],
    "untied_nobias": ["--untie-embeddings-and-output-weights", "--disable-bias-linear"],
    "scaled_embed": ["--scaled-embed"],
    "wesar_scaled_embed": ["--wesar", "--scaled-embed", "--transformer-impl", "local"],
    "embed_detach": ["--embed-detach-alpha", "0.1"],
    "llama_gqa_untied_nobias": [*LLAMA, *GQA, "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                                "--rotary-base", "5000"],
    "llama_tied_bias_kv8": [*LLAMA, "--kv-channels", "8"],
    "llama_scaled_embed": [*LLAMA, *GQA, "--disable-bias-linear", "--scaled-embed"],
    "llama_wesar": [*LLAMA, *GQA, "--disable-bias-linear", "--wesar", "--transformer-impl", "local"],
}


def train_checkpoint(path, *extra, iters=3):
    run_inprocess(tiny_args("--train-iters", iters, "--save", path, "--save-interval", max(iters, 1),
                            "--no-save-optim", "--no-save-rng", *extra, mock=True))
    return path


def tokens():
    return torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


def megatron_state_and_logits(ckpt):
    with megatron_io.loaded_checkpoint(str(ckpt)) as (model, _, common):
        logits = megatron_io.megatron_logits(model, tokens())  # [b, s, padded vocab]
        return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}, logits, common


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()


def hf_logits(path):
    with torch.no_grad():
        return hf_model(path)(tokens()).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    result = {}
    for name, extra in OPTIONS.items():
        ckpt = train_checkpoint(tmp / f"ckpt_{name}", *extra)
        state, logits, _ = megatron_state_and_logits(ckpt)
        info = export_to_hf(str(ckpt), str(tmp / f"hf_{name}"))
        result[name] = dict(ckpt=ckpt, hf=tmp / f"hf_{name}", state=state, logits=logits, info=info, tmp=tmp)
    return result


@pytest.mark.parametrize("name", list(OPTIONS))
def test_exported_logits_equal_megatron(exported, name):
    run = exported[name]
    torch.testing.assert_close(hf_logits(run["hf"]), run["logits"], rtol=1e-5, atol=1e-5)
    config = json.loads((run["hf"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM" if name.startswith("llama") else "GPT2LMHeadModel"]
    assert config["vocab_size"] == 256  # padded: every row survives
    assert config["tie_word_embeddings"] == run["info"]["tied"]
    if "scaled_embed" in name:
        assert not run["info"]["tied"]  # sqrt(d) folded into the tables, the head keeps the raw table


@pytest.mark.parametrize("name", list(OPTIONS))
def test_round_trip_keeps_every_tensor(exported, name):
    run, tmp = exported[name], exported[name]["tmp"]
    back = tmp / f"back_{name}"
    import_from_hf(str(run["hf"]), str(back))
    state, logits, common = megatron_state_and_logits(back)
    assert common["iteration"] == 0 and not common["has_optimizer"]
    torch.testing.assert_close(logits, run["logits"], rtol=1e-5, atol=1e-5)
    again = export_to_hf(str(back), str(tmp / f"hf_again_{name}"))
    first, second = hf_model(run["hf"]).state_dict(), hf_model(again["output"]).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "export -> import -> export changed a tensor"
    if not run["info"]["folded"]:  # nothing folded: the imported checkpoint is the original, bit for bit
        assert state.keys() == run["state"].keys()
        assert all(torch.equal(state[k], run["state"][k]) for k in state)


def test_embed_layernorm_is_refused_by_name(tmp_path, capsys):
    ckpt = train_checkpoint(tmp_path / "ckpt", "--embed-layernorm", iters=0)
    with pytest.raises(ExportError, match="--embed-layernorm"):
        export_to_hf(str(ckpt), str(tmp_path / "hf"))
    from tools.convert_checkpoint import main

    assert main(["--load", str(ckpt), "--to", "hf", "--output", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "error: cannot export to GPT-2" in err and "--embed-layernorm" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written, not even a temporary


def test_failed_export_leaves_nothing_and_keeps_an_earlier_export(exported, tmp_path, monkeypatch):
    """The export is built in a temporary sibling and renamed into place when complete."""
    from megatron_patch.export import convert

    run = exported["vanilla"]
    out = tmp_path / "hf"
    export_to_hf(str(run["ckpt"]), str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise ExportError("tokenizer failed")

    monkeypatch.setattr(convert, "export_tokenizer", broken)
    with pytest.raises(ExportError, match="tokenizer failed"):
        export_to_hf(str(run["ckpt"]), str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not a model directory"):
        export_to_hf(str(run["ckpt"]), str(tmp_path / "notes"))


@pytest.mark.parametrize("flags, named", [
    (["--swiglu"], "--swiglu"),
    (["--normalization", "RMSNorm"], "RMSNorm"),
    (["--position-embedding-type", "rope"], "rope"),
    (["--group-query-attention", "--num-query-groups", "2"], "--group-query-attention"),
    (["--qk-layernorm"], "--qk-layernorm"),
    # Llama-shaped, with what LlamaForCausalLM lacks
    ([*LLAMA, "--qk-layernorm"], "nor to Llama: the checkpoint uses --qk-layernorm"),
    ([*LLAMA, "--rotary-percent", "0.5"], "--rotary-percent 0.5 (Llama rotates the whole head)"),
    ([*LLAMA, "--embed-layernorm"], "--embed-layernorm"),
    ([*LLAMA, "--apply-residual-connection-post-layernorm"], "nor to Llama: the checkpoint uses --apply-residual"),
    (["--swiglu", "--position-embedding-type", "rope"], "--normalization LayerNorm (Llama uses RMSNorm)"),
    (["--normalization", "RMSNorm", "--swiglu"], "--position-embedding-type learned_absolute (Llama uses rope)"),
])
def test_unsupported_architectures_are_named(flags, named):
    from megatron_patch.export.convert import check_exportable
    from megatron_patch.training.arguments import build_parser
    from megatron_patch.training.model_builder import transformer_config_from_args, validate_model_args

    args = build_parser().parse_args(tiny_args(*flags, mock=True))
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.virtual_pipeline_model_parallel_size = None
    validate_model_args(args)
    with pytest.raises(ExportError, match=re.escape(named)):
        check_exportable(transformer_config_from_args(args), args)


def test_reshard_tp1_to_tp2_then_export(exported, tmp_path):
    """TP=1 checkpoint -> loaded and saved at TP=2 (torchrun, 2 processes) -> loaded at TP=1 and
    exported in one process: every tensor is the original's. (PP resharding of the same files:
    tests/distributed/test_train_parallel.py, pp2_resumed_from_pp1.)"""
    from tests.train_helpers import torchrun_cmd, write_json

    src = exported["vanilla"]["ckpt"]
    common = ["--train-iters", 3, "--no-load-optim", "--no-load-rng", "--no-save-optim", "--no-save-rng"]
    spec = [tiny_args("--tensor-model-parallel-size", 2, "--load", src, "--save", tmp_path / "tp2", *common,
                      mock=True)]
    write_json(tmp_path / "spec.json", [[str(a) for a in argv] for argv in spec])
    proc = subprocess.run(torchrun_cmd(ROOT / "tests/distributed/reshard_worker.py", [tmp_path / "spec.json"]),
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    saved = megatron_io.read_common(str(tmp_path / "tp2"))[1]["layout"]
    assert (saved["tp"], saved["pp"]) == (2, 1)
    state, _, _ = megatron_state_and_logits(tmp_path / "tp2")
    original = exported["vanilla"]["state"]
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)
    export_to_hf(str(tmp_path / "tp2"), str(tmp_path / "hf"))
    first, second = hf_model(exported["vanilla"]["hf"]).state_dict(), hf_model(tmp_path / "hf").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fused_gelu_checkpoint_exports_as_tanh_gelu(tmp_path):
    """GPU runs compute megatron's fused bias-GELU, the tanh approximation; the checkpoint records
    it, and evaluation and export compute that GELU on any device."""
    ckpt = train_checkpoint(tmp_path / "ckpt")
    with megatron_io.loaded_checkpoint(str(ckpt)) as (model, args, common):
        assert common["activation"] == "gelu"  # trained on CPU: exact erf GELU
        with torch.no_grad():  # FFN inputs of order 1, where the two GELUs differ by ~1e-3
            for layer in model.decoder.layers:
                layer.mlp.linear_fc1.weight.mul_(30.0)
        exact = megatron_io.megatron_logits(model, tokens())
        fused = megatron_io.build_model(args, common["padded_vocab_size"], activation="gelu_tanh")
        fused.load_state_dict(model.state_dict())  # as a GPU run with the fused kernel saves it
        megatron_io.save_model_checkpoint(fused, args, str(tmp_path / "gpu"), common["vocab_size"],
                                          common["padded_vocab_size"])
    _, logits, common = megatron_state_and_logits(tmp_path / "gpu")
    assert common["activation"] == "gelu_tanh"
    with pytest.raises(AssertionError):  # the two GELUs differ by more than the export's tolerance
        torch.testing.assert_close(logits, exact, rtol=1e-5, atol=1e-5)
    export_to_hf(str(tmp_path / "gpu"), str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu_new"
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), logits, rtol=1e-5, atol=1e-5)


def test_import_names_what_is_wrong_with_its_input(exported, tmp_path):
    run = exported["vanilla"]
    for source, named in ((tmp_path / "missing", "no such directory"),
                          (run["ckpt"], "is a trainer checkpoint, not a Hugging Face directory"),
                          (tmp_path, "has no config.json")):
        with pytest.raises(ExportError, match=named):
            import_from_hf(str(source), str(tmp_path / "out"))
    with pytest.raises(ExportError, match="already holds a trainer run"):  # would move its tracker back
        import_from_hf(str(run["hf"]), str(run["ckpt"]))
    assert (run["ckpt"] / "latest_checkpointed_iteration.txt").read_text() == "3"
