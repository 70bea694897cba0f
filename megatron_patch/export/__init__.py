"""Checkpoint conversion: megatron_patch distributed checkpoints <-> Hugging Face GPT-2 directories.

- `megatron_io`: load a checkpoint of any TP/PP layout into one TP=1/PP=1 model; write a model
  back as a trainer checkpoint (iteration 0, model only).
- `hf`: the tensor mapping (QKV de-interleave, Conv1D transposes, exact folds), the GPT2Config,
  the tokenizer files, and the refusal of options GPT-2 cannot represent (`ExportError`).
"""

from .hf import ExportError  # noqa: F401
