"""spinfx: a declarative graph-rewrite compiler for PyTorch transformers."""
from spinfx.errors import SpinfxError, Unsupported

__version__ = "0.1.0"
__all__ = ["SpinfxError", "Unsupported", "__version__"]
