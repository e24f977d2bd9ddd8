"""Checkpoints and transformers: Hugging Face model directories in (hf), rewritten checkpoints out and
back in (offline), the streaming rewrite of a checkpoint (stream), mixture-of-experts modules (moe)."""
