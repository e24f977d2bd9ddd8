"""Tensor parallelism: real processes (ranks), sharded checkpoints (sharded), and what a user runs —
`spinfx rewrite --tp`, `spinfx consolidate`, torchrun generation (tp)."""
