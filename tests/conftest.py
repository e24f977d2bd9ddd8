"""Test session set-up.

`python -m pytest` (and `python -c`) put the current directory on sys.path; run from the repo root
that would make `import kernels` find this repo's kernels/ folder, which transformers probes for.
The rooms are only ever imported as `spinfx.*`, so the repo root is taken off sys.path here.
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
