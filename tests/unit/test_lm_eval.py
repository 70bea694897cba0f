"""lm-evaluation-harness and transformers' pipeline as clients of an exported model.

A tiny Llama-shaped model (RMSNorm, SwiGLU, RoPE, GQA) with a SentencePiece tokenizer trained here
memorises six sentences; it is exported to Hugging Face and then
  - `lm_eval --model hf` runs a local LAMBADA task (lm-eval's lambada_openai protocol on a jsonl
    made here, offline) and must give tools/evaluate.py --task lambada's accuracy exactly and its
    perplexity to 1e-4 (relative: fp32 logits of two implementations, summed over 18 targets);
  - pipeline("text-generation") must continue a prompt with megatron's greedy tokens.
The examples are the sentences (memorised: right), the same with a wrong last word (wrong) and
unseen texts, so an accuracy of 0 or 1 (a broken comparison) is ruled out.
"""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it

from megatron_patch.evaluation import lm_eval_task  # noqa: E402
from megatron_patch.export import megatron_io  # noqa: E402
from megatron_patch.export.convert import export_to_hf  # noqa: E402
from tests.train_helpers import run_inprocess, subprocess_env, tiny_args  # noqa: E402
from tests.unit.test_convert_checkpoint import GQA, LLAMA  # noqa: E402
from tests.unit.test_data_pipeline import make_documents, preprocess, train_tokenizer, write_jsonl  # noqa: E402
from tools import evaluate  # noqa: E402

SENTENCES = ["the king of the river city sang a song", "water and light made the school house new",
             "people of the world play a game of art", "history is the language of the film people",
             "a new system for music and science", "his first war was a war of number"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    tok = tmp / "tok"
    train_tokenizer.main(["--input", str(write_jsonl(tmp / "tok.jsonl", make_documents(300) + SENTENCES * 5)),
                          "--vocab-size", "400", "--output-prefix", str(tok), "--threads", "1"])
    write_jsonl(tmp / "train.jsonl", SENTENCES * 50)
    preprocess(tmp, tmp / "train.jsonl", tok.with_suffix(".model"), "--append-eod", prefix="train")
    sp = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok.with_suffix(".model")]
    run_inprocess(tiny_args("--train-iters", 80, "--lr", "1e-2", "--min-lr", "1e-3", *LLAMA, *GQA,
                            "--disable-bias-linear",
                            "--save", tmp / "ckpt", "--save-interval", 80, "--no-save-optim", "--no-save-rng", *sp,
                            data=tmp / "train_text_document"))
    export_to_hf(str(tmp / "ckpt"), str(tmp / "hf"))
    wrong = [" ".join(s.split()[:-1] + ["river"]) for s in SENTENCES]
    write_jsonl(tmp / "lambada.jsonl", SENTENCES + wrong + make_documents(6, seed=9))
    return tmp


def test_lm_eval_agrees_with_evaluate(exported):
    tmp = exported
    ours_json = tmp / "ours.json"
    assert evaluate.main(["--load", str(tmp / "ckpt"), "--input", str(tmp / "lambada.jsonl"), "--task", "lambada",
                          "--output-json", str(ours_json)]) == 0
    ours = json.loads(ours_json.read_text())
    assert ours["examples"] == 18 and ours["skipped"] == 0
    assert 0 < ours["accuracy"] < 1, ours  # memorised sentences right, the others not: a real comparison

    lm_eval_task.write_lambada_task(str(tmp / "lambada.jsonl"), str(tmp / "tasks"))
    cmd = lm_eval_task.command(str(tmp / "hf"), "lambada_local", str(tmp / "tasks"), str(tmp / "lm_eval_out"),
                               lm_eval=sys.executable)
    cmd[1:1] = ["-m", "lm_eval"]
    env = lm_eval_task.offline_env(subprocess_env())
    env["HF_DATASETS_CACHE"] = str(tmp / "datasets_cache")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    theirs = lm_eval_task.read_results(str(tmp / "lm_eval_out"), "lambada_local")
    assert theirs["acc"] == ours["accuracy"]
    assert theirs["perplexity"] == pytest.approx(ours["word_perplexity"], rel=1e-4)


def test_pipeline_generates_megatron_greedy_tokens(exported):
    """transformers 5's pipeline decodes the new tokens alone, and SentencePiece decoding drops the
    first piece's "▁" (as sentencepiece's DecodeIds does), so its text loses the space between
    prompt and continuation; the tokens are megatron's, and decoding the whole sequence is exact."""
    from transformers import AutoTokenizer, pipeline

    tmp = exported
    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "hf"), local_files_only=True)
    prompt = "the king of the"
    ids = tokenizer(prompt)["input_ids"]
    with megatron_io.loaded_checkpoint(str(tmp / "ckpt")) as (model, _, _):
        for _ in range(6):  # greedy continuation by megatron's own logits
            logits = megatron_io.megatron_logits(model, torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    generate = pipeline("text-generation", model=str(tmp / "hf"), device="cpu")
    out = generate(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(out) == ids
    assert tokenizer.decode(ids) == "the king of the river city sang"  # memorised, spaces and all
