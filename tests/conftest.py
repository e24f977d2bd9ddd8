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


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`./run test`: one worker per CPU), each worker's torch takes its share of the
    cores instead of all of them (two workers × two threads on two cores lost time to oversubscription);
    subprocesses the tests start inherit the same share through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        n = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


_share_the_cores_between_workers()
