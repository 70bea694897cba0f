"""Adaptations that let unmodified megatron-core run where it otherwise could not (CPU)."""
