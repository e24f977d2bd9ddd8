"""Checkpoints and transformers: Hugging Face model directories in (hf), rewritten checkpoints out and
back in (parts: the format; write; read), the streaming rewrite of a checkpoint (stream), mixture-of-experts modules (moe)."""
