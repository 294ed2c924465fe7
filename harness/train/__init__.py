"""Pretraining: the resumable, checkpointed, optionally distributed training loop."""
