"""Checkpoint conversion: megatron_patch distributed checkpoints <-> Hugging Face directories.

- `megatron_io`: load a checkpoint of any TP/PP layout into one TP=1/PP=1 model; write a model
  back as a trainer checkpoint (iteration 0, model only).
- `hf`: the GPT-2 tensor mapping (QKV de-interleave, Conv1D transposes, exact folds) and config.
- `errors`: `ExportError`, for options no target represents.
- `llama`: the LlamaForCausalLM mapping (per-group QKV split, SwiGLU halves, RoPE layouts) and config.
- `sentencepiece_hf`, `tokenizer_files`: the tokenizer written next to the model, checked against
  the trainer's ids.
- `convert`: which target a model exports to (`check_exportable`), export_to_hf / import_from_hf
  (tools/convert_checkpoint.py).
"""

from .errors import ExportError  # noqa: F401
