"""What a .bin/.idx pair was made with, kept next to it, and the largest token id it holds.

- `<prefix>.tokenizer.json`, written by tools/preprocess_data.py: the tokenizer type, its
  vocabulary size and the sha256 of its files. The trainer refuses data made with another
  tokenizer (another type, size, or other files), even one of the same size.
- `pair_problem(prefix)`: a truncated or mismatched .bin/.idx pair, found from sizes alone before
  megatron-core reads it (its reader fails with "buffer is smaller than requested size").
- `<prefix>.maxid.json`: the largest id in the .bin, found by a chunked max over the memmap (a few
  seconds per GB) and cached, keyed by the .bin's size and mtime, so that only the first run
  pays for it. Ids past the tokenizer's range would otherwise crash training mid-run.
- `index_fingerprint(prefix)`: the sha256 of the .idx (document lengths and offsets), cached in
  `<prefix>.idxsha.json` by size and mtime like the max id. megatron-core's index caches
  (`cache/GPTDataset_indices`, the blend's) are a function of the .idx; the trainer puts this
  fingerprint into their key, so data remade under the same prefix gets new indices instead of
  stale ones (an IndexError, or the wrong samples).
All are written atomically (tmp + rename); an unwritable data directory only loses the cache.
"""

import hashlib
import json
import os
import struct
from typing import Optional

import numpy as np

CHUNK_TOKENS = 1 << 26  # 64M tokens (128 MB of uint16) per step of the max scan


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_identity(tokenizer_type: str, vocab_size: int, **files: Optional[str]) -> dict:
    """{"tokenizer_type", "vocab_size", "files_sha256": {name: sha256}} of a tokenizer."""
    return {"tokenizer_type": tokenizer_type, "vocab_size": int(vocab_size),
            "files_sha256": {name: _sha256(path) for name, path in sorted(files.items()) if path}}


def _write_json(path: str, obj: dict) -> bool:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
        return True
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        return False


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_tokenizer_identity(prefix: str, identity: dict) -> None:
    if not _write_json(prefix + ".tokenizer.json", identity):
        raise OSError(f"cannot write {prefix}.tokenizer.json")


def remove_records(prefix: str) -> None:
    """Drop the identity and max-id records of the dataset at `prefix` (before replacing it)."""
    for suffix in (".tokenizer.json", ".maxid.json", ".idxsha.json"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


def read_tokenizer_identity(prefix: str) -> Optional[dict]:
    return _read_json(prefix + ".tokenizer.json")


def identity_differences(saved: dict, current: dict) -> list:
    """['vocabulary size 8000 vs 16000', ...] between the data's tokenizer and this run's."""
    out = []
    if saved.get("tokenizer_type") != current["tokenizer_type"]:
        out.append(f"type {saved.get('tokenizer_type')} vs {current['tokenizer_type']}")
    if saved.get("vocab_size") != current["vocab_size"]:
        out.append(f"vocabulary size {saved.get('vocab_size')} vs {current['vocab_size']}")
    for name, digest in (saved.get("files_sha256") or {}).items():
        mine = current["files_sha256"].get(name)
        if mine is not None and mine != digest:
            out.append(f"{name} has other contents (sha256 {digest[:12]} vs {mine[:12]})")
    return out


def max_token_id(prefix: str, dtype) -> int:
    """The largest id in <prefix>.bin (-1 if empty), cached in <prefix>.maxid.json."""
    path = prefix + ".bin"
    stat = os.stat(path)
    key = {"bin_size": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}
    cached = _read_json(prefix + ".maxid.json")
    if cached and all(cached.get(k) == v for k, v in key.items()) and "max_id" in cached:
        return int(cached["max_id"])
    count = stat.st_size // np.dtype(dtype).itemsize
    top = -1
    if count:
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
        for start in range(0, count, CHUNK_TOKENS):
            top = max(top, int(tokens[start:start + CHUNK_TOKENS].max()))
    _write_json(prefix + ".maxid.json", {**key, "max_id": top})
    return top


def index_fingerprint(prefix: str) -> str:
    """sha256 of <prefix>.idx, cached in <prefix>.idxsha.json (keyed by the .idx's size and mtime)."""
    path = prefix + ".idx"
    stat = os.stat(path)
    key = {"idx_size": stat.st_size, "idx_mtime_ns": stat.st_mtime_ns}
    cached = _read_json(prefix + ".idxsha.json")
    if cached and all(cached.get(k) == v for k, v in key.items()) and "sha256" in cached:
        return cached["sha256"]
    digest = _sha256(path)
    _write_json(prefix + ".idxsha.json", {**key, "sha256": digest})
    return digest


# megatron-core's .idx layout (datasets/indexed_dataset.py): magic, version <Q, dtype code <B,
# sequence count <Q, document count <Q, then int32 lengths, int64 byte pointers, int64 doc indices.
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = len(_MAGIC) + 8 + 1 + 8 + 8
_ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes


def pair_problem(prefix: str) -> Optional[str]:
    """What is inconsistent in <prefix>.bin/.idx (one line), or None."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER)
        if len(head) < _HEADER or head[:len(_MAGIC)] != _MAGIC:
            return f"{idx} is not a megatron index (truncated at {idx_size} bytes or another format)"
        code = head[len(_MAGIC) + 8]
        sequences, documents = struct.unpack("<QQ", head[len(_MAGIC) + 9:])
        expected_idx = _HEADER + 12 * sequences + 8 * documents
        if code not in _ITEM_SIZES or idx_size != expected_idx:
            return (f"{idx} is truncated or corrupt: {idx_size} bytes, its header ({sequences} sequences, "
                    f"{documents} documents) needs {expected_idx}")
        if sequences == 0:
            return None
        f.seek(_HEADER + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(_HEADER + 4 * sequences + 8 * (sequences - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    expected_bin = last_pointer + last_length * _ITEM_SIZES[code]
    bin_size = os.path.getsize(bin_)
    if bin_size != expected_bin:
        return (f"{bin_} has {bin_size} bytes, but {idx} indexes {expected_bin}: "
                f"{'truncated' if bin_size < expected_bin else 'not the .bin of this index'}; remake it with "
                "tools/preprocess_data.py")
    return None
