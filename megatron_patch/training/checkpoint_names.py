"""Names in a --save directory that the checkpoint writer (checkpointing.py) and the shared-storage
proof (shared_storage.py) both read; here so that neither imports the other for them."""

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's: the iteration last published
