"""Test session set-up.

`python -m pytest` (and `python -c`) put the current directory on sys.path; run from the repo root
that would make `import kernels` find this repo's kernels/ folder, which transformers probes for.
The rooms are only ever imported as `spinfx.*`, so the repo root is taken off sys.path here.

The run's header names the installed releases that spinfx's behaviour depends on, so a red run says
which release it ran against (tests/test_layout.py checks they are inside pyproject's ranges).
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
for _name in ("kernels", "passes", "patterns", "rewrite"):
    _mod = sys.modules.get(_name)
    if _mod is not None and os.path.abspath(getattr(_mod, "__file__", "") or "").startswith(_ROOT):
        del sys.modules[_name]

pytest_plugins = ["pytester"]

TRACKED = ("torch", "transformers", "compressed-tensors", "triton", "safetensors", "gguf")


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def pytest_report_header(config):
    return "spinfx against: " + ", ".join(f"{k} {v}" for k, v in installed_versions().items())
