"""Megatron-LM-compatible GPT pre-training on megatron-core (pretrain_gpt.py's machinery).

Modules, by concern (each defines its own command-line group next to the code that uses it):
  arguments     parser assembly, model/training flags, cross-flag validation
  initialize    torch.distributed (nccl on CUDA, gloo + compat.cpu on CPU), parallel_state, seeds
  model_builder TransformerConfig/StabilityConfig from flags, model chunks wrapped in DDP
  optimizer     megatron-core optimizer + OptimizerParamScheduler
  data          tokenizer, GPTDataset via BlendedMegatronDatasetBuilder, batch iterators
  loop          train step on get_forward_backward_func, evaluation, the training loop
  callbacks     per-step hook protocol for the loop
  checkpointing dist_checkpointing save/load, atomic, SIGTERM handling
  logging       Megatron-LM log lines, throughput/MFU, TensorBoard, wandb
  pretrain      parse -> build -> train, with one-line errors
"""
