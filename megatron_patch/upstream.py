"""What differs between the megatron-core releases this package supports, decided in one place.

Tested: 0.16.1 (Python 3.11) and the newest 0.19.x (Python 3.12); setup.py admits the range
between them. Every difference the rest of the package must know about is answered here, by
asking upstream's code (a feature check) where it can be asked, by its version where not. Each
entry names the upstream change. CPU-only answers live in compat/cpu.py; this module says what
differs between releases on any device.
"""

import os
import warnings
from importlib import metadata

import torch
from packaging.version import Version


def _installed_version() -> str:
    """The installed distribution's version. Reading its metadata imports nothing: importing
    megatron.core costs seconds of start-up (pretrain_gpt.py --help reads this module)."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        import megatron.core

        return megatron.core.__version__


# .public: 0.19's megatron.core.__version__ appends "+<git hash>" of whatever repository the
# package sits in (package_info.py).
VERSION = Version(Version(_installed_version()).public)
TESTED = ("0.16.1", "0.19.x")


# ---------------------------------------------------------------- layer specs
def mlp_submodules(mlp_spec):
    """The MLPSubmodules (linear_fc1, linear_fc2) of a layer spec's `mlp` entry.
    0.16: `ModuleSpec(module=MLP, submodules=MLPSubmodules(...))`. 0.18 onwards hand the MLP over
    as `functools.partial(MLP.as_mlp_submodule, submodules=...)`, which has no `.submodules`;
    `spec_utils.get_submodules` (0.17 onwards) reads both forms."""
    try:
        from megatron.core.transformer.spec_utils import get_submodules
    except ImportError:  # 0.16: every spec entry is a ModuleSpec
        return mlp_spec.submodules
    return get_submodules(mlp_spec)


# ---------------------------------------------------------------- checkpoints
# torch.distributed.checkpoint's CheckpointException (raised for a truncated .metadata or .distcp)
# derives from BaseException, so `except Exception` misses it. From 0.19 the common state is read
# through torch.distributed.checkpoint as well, so every checkpoint read catches this pair.
def load_errors() -> tuple:
    """What a failed checkpoint read raises (imported on use: torch.distributed.checkpoint costs
    seconds of start-up, and pretrain_gpt.py --help must not pay them)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


# 0.16-0.18 write the checkpoint's common (non-sharded) state to <ckpt>/common.pt. 0.19 stores it
# as one ShardedObject "common_state" inside the torch_dist files and writes no common.pt; its
# `load_common_state_dict` reads both layouts, 0.16's reads only common.pt. Version check: the
# writer's layout cannot be asked without writing a checkpoint.
COMMON_STATE_FILE = "common.pt"
COMMON_STATE_IN_TORCH_DIST = VERSION >= Version("0.19")


def common_state_location(path: str) -> str:
    """'common.pt' or 'torch_dist': where the checkpoint at `path` keeps its common state."""
    return "common.pt" if os.path.isfile(os.path.join(path, COMMON_STATE_FILE)) else "torch_dist"


def load_common_state(path: str) -> dict:
    """The common state of the checkpoint at `path`, whichever way it is stored, on any supported
    release. Under 0.16-0.18 a 0.19 checkpoint's common state is read straight from the
    torch_dist files (as 0.19's `load_common_state_dict` does), so the caller can name the
    release that wrote it; the sharded part of such a checkpoint does not load there."""
    # Reading outside a process group, torch.distributed.checkpoint warns on stderr that it
    # assumes a single process, which is what is meant: that one warning is not passed on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        return _load_common_state(path)


def _load_common_state(path: str) -> dict:
    from megatron.core import dist_checkpointing

    if COMMON_STATE_IN_TORCH_DIST or common_state_location(path) == "common.pt" \
            or not os.path.isfile(os.path.join(path, ".metadata")):  # not a checkpoint: upstream says so
        return dist_checkpointing.load_common_state_dict(path)
    import io

    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    key = ShardedObject("common_state", None, (1,), (0,)).unique_key
    holder = {key: io.BytesIO()}
    dcp.load(holder, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    loaded = holder[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


def can_load_checkpoint_from(common_state_location_: str) -> bool:
    """Whether this release's dist_checkpointing.load reads a checkpoint whose common state is in
    `common_state_location_` (0.16-0.18 need common.pt; 0.19 reads both)."""
    return COMMON_STATE_IN_TORCH_DIST or common_state_location_ == "common.pt"


# ---------------------------------------------------------------- optimizer
# The per-group schedule values the OptimizerParamScheduler reads (`param_group.get('max_lr', ...)`
# in get_lr, 'start_wd'/'end_wd' in get_wd). Both releases store them in every parameter group and
# a checkpoint's groups bring the saved values back on load; 0.19 also matches saved groups to the
# current ones by them (`optimizer.param_group_identifier_keys` gained them), so a resume with
# another --lr fails there with "Could not find parameter group with key ...". Both are answered
# alike, whatever upstream matches by: compat/distributed_optimizer.py, fault 4.
SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


# ---------------------------------------------------------------- models
# 0.19's GPTModel logs "GPTModel IS DEPRECATED ..." (a logging WARNING on rank 0, no flag turns it
# off) in favour of HybridModel. GPTModel still builds and trains the same network; this package
# keeps building it (README, "megatron-core versions"). Nothing to decide in code.
