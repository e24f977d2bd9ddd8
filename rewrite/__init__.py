"""spinfx: a declarative graph-rewrite compiler for PyTorch transformers."""
from spinfx.engine.errors import BadInput, SpinfxError, Unsupported

__version__ = "0.1.0"

from spinfx import passes, recipe  # noqa: E402  (registry and Recipe for users building recipes in code)


def inspect(model, example_inputs=None, name=None):
    """What each structure finder sees in `model` and whether its family's contract holds (a Report)."""
    from spinfx.api import inspect as _inspect

    return _inspect(model, example_inputs, name)


def rewrite(model, recipe=recipe.DEFAULT_RECIPE, example_inputs=None, calib=None):
    """Rewrite `model` with `recipe` (preset name, YAML path or Recipe); returns .module, .report."""
    from spinfx.api import rewrite as _rewrite

    return _rewrite(model, recipe, example_inputs, calib)


def load(path, **options):
    """A checkpoint directory written by `Result.save` / `spinfx rewrite` (or any HF model directory)
    as a runnable model: the model class, online rotations and activation/KV fake quantization
    re-attached; `generate` works. Options: see `spinfx.checkpoint.read.load` (cpu_compute_dtype; fuse: sibling
    quantized linears (q/k/v, gate/up) run as one packed linear each, bit-identical to separate ones)."""
    from spinfx.checkpoint.read import load as _load

    return _load(path, **options)


def trace(model, example_inputs=None):
    """The canonical ATen program of `model` (an nn.Module, an HF dir or "smollm2")."""
    from spinfx.api import load

    return load(model, example_inputs)[0]


__all__ = ["SpinfxError", "BadInput", "Unsupported", "inspect", "load", "rewrite", "trace", "__version__"]
