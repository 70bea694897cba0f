"""Bad input: one clear error line, non-zero exit, nothing written or overwritten."""

import hashlib
import subprocess

import pytest

from tests.train_helpers import (ROOT, make_corpus, one_error_line, pretrain_cmd, run_inprocess, subprocess_env,
                                 tiny_args)


def snapshot(root):
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real checkpoint directory (iteration 2) to break in different ways."""
    root = tmp_path_factory.mktemp("ckpt")
    run_inprocess(tiny_args("--train-iters", 4, "--save", root, "--save-interval", 2, "--exit-interval", 2,
                            mock=True))
    return root


def test_missing_data_path(tmp_path, capsys):
    line = one_error_line(capsys, tiny_args("--train-iters", 3, data=tmp_path / "missing"))
    assert "missing.bin not found" in line


def test_data_made_with_another_tokenizer(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "c", 50, max_token=4000)
    line = one_error_line(capsys, tiny_args("--train-iters", 3, data=corpus))
    assert "vocabulary mismatch" in line and "token id 4000" in line


def test_empty_split_is_refused_instead_of_hanging(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "c", 20)
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--split", "98,1,1", "--eval-iters", 1,
                                            data=corpus))
    assert "validation split" in line and "is empty" in line


def test_heads_and_batch_divisibility(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group exists
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--tensor-model-parallel-size", 2,
                                            "--num-attention-heads", 3, "--hidden-size", 48, mock=True))
    assert "not divisible by --tensor-model-parallel-size 2" in line
    line = one_error_line(capsys, tiny_args("--train-iters", 3, "--global-batch-size", 12, mock=True))
    assert "--global-batch-size 12 is not divisible by --micro-batch-size 4 x data-parallel size 2" in line


@pytest.mark.parametrize("damage, message", [
    ("tracker_text", "unreadable checkpoint tracker"),
    ("tracker_points_nowhere", "is missing"),
    ("truncated_shards", "a tensor file (.distcp) ended early"),
    ("garbage_common", "unreadable checkpoint"),
])
def test_unreadable_checkpoint_overwrites_nothing(tmp_path, capsys, saved, damage, message):
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    it = root / "iter_0000002"
    if damage == "tracker_text":
        (root / "latest_checkpointed_iteration.txt").write_text("two")
    elif damage == "tracker_points_nowhere":
        (root / "latest_checkpointed_iteration.txt").write_text("7")
    elif damage == "truncated_shards":
        for shard in it.glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[:100])
    elif (it / "common.pt").exists():  # megatron-core 0.16-0.18 keep the common state there
        (it / "common.pt").write_bytes(b"not a torch file")
    else:  # 0.19 onwards: inside the torch_dist files, read through .metadata
        (it / ".metadata").write_bytes(b"not a torch file")
    before = snapshot(root)
    line = one_error_line(capsys, tiny_args("--train-iters", 4, "--load", root, "--save", root,
                                            "--save-interval", 1, mock=True))
    assert message in line
    assert snapshot(root) == before


def test_checkpoint_from_another_vocabulary(tmp_path, capsys, saved):
    line = one_error_line(capsys, tiny_args("--train-iters", 4, "--load", saved, "--vocab-size", 300,
                                            mock=True))
    assert "vocabulary mismatch" in line and "vocab 201" in line


@pytest.mark.slow
def test_command_line_prints_one_line_and_exits_nonzero(tmp_path):
    """The real entry point (two processes side by side to share the interpreter start-up cost)."""
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    procs = [subprocess.Popen(pretrain_cmd(argv), cwd=ROOT, env=subprocess_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in (tiny_args("--train-iters", 3, "--bogus-flag", mock=True),
                          tiny_args("--train-iters", 3, "--load", tmp_path, mock=True))]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for (out, err, code), expect in zip(results, ("unrecognized arguments: --bogus-flag", "is missing")):
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pretrain_gpt.py: error: ") and expect in lines[0], err


def test_an_id_past_the_vocabulary_anywhere_in_the_data_is_found(tmp_path, capsys):
    """The whole .bin is scanned (chunked, cached in <prefix>.maxid.json), not only its start."""
    import json

    from megatron_patch import data_identity

    corpus = make_corpus(tmp_path / "c", 50)
    with open(corpus + ".bin", "r+b") as f:  # the very last token
        f.seek(-2, 2)
        f.write((4000).to_bytes(2, "little"))
    monkeypatched = data_identity.CHUNK_TOKENS
    data_identity.CHUNK_TOKENS = 64  # many chunks
    try:
        line = one_error_line(capsys, tiny_args("--train-iters", 3, data=corpus))
    finally:
        data_identity.CHUNK_TOKENS = monkeypatched
    assert "token id 4000" in line
    cache = json.loads(open(corpus + ".maxid.json").read())
    assert cache["max_id"] == 4000
    cache["max_id"] = 5  # the cache is used while the .bin is unchanged
    open(corpus + ".maxid.json", "w").write(json.dumps(cache))
    assert data_identity.max_token_id(corpus, "uint16") == 5


def test_data_recorded_with_another_tokenizer_is_refused(tmp_path, capsys):
    from megatron_patch import data_identity

    corpus = make_corpus(tmp_path / "c", 50)
    data_identity.write_tokenizer_identity(corpus, data_identity.tokenizer_identity("NullTokenizer", 301))
    line = one_error_line(capsys, tiny_args("--train-iters", 3, data=corpus))
    assert "was made with another tokenizer (vocabulary size 301 vs 201)" in line
    other = {"tokenizer_type": "SentencePieceTokenizer", "vocab_size": 8000,
             "files_sha256": {"tokenizer_model": "a" * 64}}
    mine = {"tokenizer_type": "SentencePieceTokenizer", "vocab_size": 8000,
            "files_sha256": {"tokenizer_model": "b" * 64}}
    assert data_identity.identity_differences(other, mine) == [
        "tokenizer_model has other contents (sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb)"]


@pytest.mark.parametrize("damage, named", [
    ("bin", "has 1494 bytes, but"), ("idx", "is truncated or corrupt"), ("magic", "is not a megatron index"),
])
def test_truncated_or_corrupt_data_files_are_named(tmp_path, capsys, damage, named):
    corpus = make_corpus(tmp_path / "c", 20, seed=3)
    path = corpus + (".bin" if damage == "bin" else ".idx")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10] if damage != "magic" else b"XXXX" + data[4:])
    if damage == "bin":
        named = f"has {len(data) - 10} bytes, but"
    line = one_error_line(capsys, tiny_args("--train-iters", 3, data=corpus))
    assert named in line and path.rsplit(".", 1)[0] in line
