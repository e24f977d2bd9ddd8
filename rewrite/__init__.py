"""spinfx: a declarative graph-rewrite compiler for PyTorch transformers."""
from spinfx.errors import BadInput, SpinfxError, Unsupported

__version__ = "0.1.0"


def inspect(model, example_inputs=None, name=None):
    """What each structure finder sees in `model` and whether its family's contract holds (a Report)."""
    from spinfx.api import inspect as _inspect

    return _inspect(model, example_inputs, name)


def trace(model, example_inputs=None):
    """The canonical ATen program of `model` (an nn.Module, an HF dir or "smollm2")."""
    from spinfx.api import load

    return load(model, example_inputs)[0]


__all__ = ["SpinfxError", "BadInput", "Unsupported", "inspect", "trace", "__version__"]
