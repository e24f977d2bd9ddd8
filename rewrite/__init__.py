"""spinfx: a declarative graph-rewrite compiler for PyTorch transformers."""
from spinfx.errors import BadInput, SpinfxError, Unsupported

__version__ = "0.1.0"


def inspect(model, example_inputs=None, name=None):
    """What each structure finder sees in `model` and whether its family's contract holds (a Report)."""
    from spinfx.api import inspect as _inspect

    return _inspect(model, example_inputs, name)


__all__ = ["SpinfxError", "BadInput", "Unsupported", "inspect", "__version__"]
