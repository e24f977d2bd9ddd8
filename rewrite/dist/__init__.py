"""Tensor parallelism: real processes, sharded checkpoints, `spinfx rewrite --tp`, torchrun generation."""
