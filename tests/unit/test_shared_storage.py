"""The pieces of the multi-node checks that one process can exercise (the real thing, across two
hosts, is tests/multihost/): which files a torch_dist checkpoint needs, and which failures count
as a lost peer."""

import torch
import torch.distributed.checkpoint as dcp

from megatron_patch.training import peers, shared_storage


def test_missing_files_names_each_absent_or_short_file_and_its_writer(tmp_path, monkeypatch):
    dcp.save({"a": torch.arange(1000.0), "b": torch.ones(10)}, checkpoint_id=str(tmp_path), no_dist=True)
    files = sorted(p.name for p in tmp_path.glob("*.distcp"))
    assert files and all(f.startswith("__0_") for f in files)
    assert shared_storage.missing_files(str(tmp_path)) == []
    monkeypatch.setattr(shared_storage, "SETTLE_SECONDS", 0.0)  # no network filesystem to wait for here
    victim = tmp_path / files[0]
    victim.write_bytes(victim.read_bytes()[:10])  # short: written elsewhere, or cut off
    assert shared_storage.missing_files(str(tmp_path)) == [(files[0], 0)]
    victim.unlink()
    assert shared_storage.missing_files(str(tmp_path)) == [(files[0], 0)]


def test_missing_files_ignores_a_directory_without_torch_dist_metadata(tmp_path):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed")
    assert shared_storage.missing_files(str(tmp_path)) == []


def test_only_communication_failures_are_diagnosed_as_a_lost_peer():
    assert peers.is_communication_failure(RuntimeError("[gloo] Timed out waiting 60000ms for recv operation"))
    assert peers.is_communication_failure(RuntimeError("Connection closed by peer [10.0.0.2]:1234"))
    assert not peers.is_communication_failure(ValueError("shape mismatch"))
    assert peers.explain_lost(RuntimeError("Timed out"), 10) is None  # no heartbeat running: re-raised as is
