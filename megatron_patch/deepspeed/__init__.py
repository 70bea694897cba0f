"""`pretrain_gpt.py --deepspeed --deepspeed-config ds.json`: the same model, data and loop on
DeepSpeed's engine (ZeRO stages 0-3) instead of megatron-core's DDP and optimizer.

  config      the flags and the JSON: checked against each other, the JSON completed from the flags
  engine      deepspeed.initialize over the megatron_patch GPTModel; the train/eval step
  checkpoint  engine.save_checkpoint/load_checkpoint behind the trainer's atomic tracker protocol

Shared with the Megatron path: parallel_state (TP; ZeRO shards over its data-parallel group),
the model builder and seeds (same init), the data iterators (same order), megatron-core's
parameter groups and OptimizerParamScheduler (same weight-decay exclusions and lr curve), the
training loop, logging and evaluation. See docs/deepspeed.md.
"""
