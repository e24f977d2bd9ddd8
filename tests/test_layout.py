"""The one-namespace layout: nothing in this repo shadows a top-level `kernels` (transformers probes
`find_spec("kernels")` and crashes on a shadowing directory), `passes`, `patterns` or `rewrite`."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_installed_spinfx_exposes_no_top_level_rooms(tmp_path):
    # a fresh interpreter outside the repo: the install must not have put kernels/passes/... on sys.path
    code = (
        "import importlib.util, os, spinfx, spinfx.kernels, transformers\n"
        "found = {n: (importlib.util.find_spec(n) or None) for n in ('kernels', 'passes', 'patterns', 'rewrite')}\n"
        "print(sorted(n for n, s in found.items() if s is not None and os.path.realpath(s.origin or str(s.submodule_search_locations)).startswith(%r)))\n"
    ) % str(REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_spinfx_subpackages_map_to_the_rooms():
    import spinfx
    import spinfx.kernels
    import spinfx.passes
    import spinfx.patterns

    for mod, room in ((spinfx, "rewrite"), (spinfx.kernels, "kernels"), (spinfx.passes, "passes"),
                      (spinfx.patterns, "patterns")):
        # spinfx.kernels is a namespace package (no __init__.py, see the test below): read a module of it
        some = mod.__file__ or str(next(Path(next(iter(mod.__path__))).glob("*.py")))
        assert Path(os.path.realpath(some)).parent == REPO / room


def test_no_code_imports_a_bare_room():
    offenders = []
    for room in ("rewrite", "passes", "patterns", "kernels", "tests", "bench"):
        for f in (REPO / room).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                s = line.strip()
                for name in ("kernels", "passes", "patterns", "rewrite"):
                    if s.startswith((f"import {name}", f"from {name} ", f"from {name}.")):
                        offenders.append(f"{f.relative_to(REPO)}:{i}: {s}")
    assert not offenders, offenders


def test_transformers_kernels_probe_is_not_us():
    # what transformers does at import: find_spec("kernels") must not be this repo's folder, also in
    # this very process (tests/conftest.py keeps the repo root off sys.path under `python -m pytest`)
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        assert not os.path.realpath(spec.origin or "").startswith(str(REPO))
    import transformers  # noqa: F401  (crashes if a shadowing `kernels` is found)


def test_kernels_from_the_repo_root_is_not_the_kernels_room(tmp_path):
    # `python -c` puts the cwd first on sys.path, before any installed package: run from the repo root,
    # a kernels/__init__.py made the room the top-level `kernels` that transformers probes for. Without
    # it the folder is at most a PEP 420 namespace portion: any installed `kernels` wins over it, and
    # alone it is no module at all (no origin, nothing to execute; transformers counts a namespace
    # package with no version as not installed).
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    stand_in = tmp_path / "site" / "kernels"  # what an installed kernels package looks like
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # on sys.path after the cwd
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(stand_in / "__init__.py"), out.stdout + out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", probe + "; import transformers"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip()
    assert origin == "None" or not os.path.realpath(origin).startswith(str(REPO)), origin


ENGINE = REPO / "rewrite" / "engine"  # the package spinfx.engine: every file in it is the engine


def test_engine_is_small_and_knows_no_model_family():
    import re

    total = 0
    families = re.compile(r"(?i:\b(llama|mistral|qwen2?|gemma|phi-?3|gpt-?2|smollm2?)\b)|\bOPT\b")
    files = sorted(ENGINE.rglob("*.py"))
    assert {f.stem for f in files} >= {"graph", "pattern", "match", "rule", "pipeline", "certify"}, files
    for f in files:
        text = f.read_text()
        total += len(text.splitlines())
        assert not families.search(text), f"{f.relative_to(REPO)} mentions {families.search(text).group(0)}"
    assert total < 1500, f"the engine (rewrite/engine/) grew to {total} lines"


# ---- imports point down only -----------------------------------------------------------------------
# kernels (leaves) <- engine (spinfx.engine: the DSL, matcher, rules, pipeline, certificates, printer,
#   report, errors) <- patterns (written in the engine's DSL) <- passes <- drivers (everything else in
#   rewrite/: the front door, api, recipe, backend, checkpoint/, tools/, dist/, testing/)
LAYERS = ("kernels", "engine", "patterns", "passes", "drivers")
ALLOWED = {layer: set(LAYERS[: i + 1]) for i, layer in enumerate(LAYERS)}


def _layer_of_module(name: str) -> str:
    """'spinfx.passes.shard' -> 'passes'; 'spinfx.engine.graph' -> 'engine'; 'spinfx.dist.tp', 'spinfx' -> 'drivers'."""
    parts = name.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS[:-1] else "drivers"


def _layer_of_file(f: Path) -> str:
    rel = f.relative_to(REPO).parts
    if rel[0] in ("kernels", "passes", "patterns"):
        return rel[0]
    return "engine" if rel[:2] == ("rewrite", "engine") else "drivers"


def test_layer_of_a_file_and_a_module():
    assert _layer_of_file(REPO / "rewrite" / "engine" / "graph.py") == _layer_of_module("spinfx.engine.graph") == "engine"
    assert _layer_of_file(REPO / "rewrite" / "api.py") == _layer_of_module("spinfx.api") == "drivers"
    assert _layer_of_file(REPO / "rewrite" / "dist" / "tp.py") == _layer_of_module("spinfx") == "drivers"
    assert _layer_of_file(REPO / "passes" / "shard.py") == _layer_of_module("spinfx.passes.shard") == "passes"


def test_imports_point_down_only():
    import ast

    offenders = []
    for room in ("rewrite", "passes", "patterns", "kernels"):
        for f in sorted((REPO / room).rglob("*.py")):
            mine = _layer_of_file(f)
            for node in ast.walk(ast.parse(f.read_text())):  # lazy imports inside functions count too
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "spinfx":
                    names = [node.module] if node.module != "spinfx" else [f"spinfx.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.split(".")[0] == "spinfx"]
                for name in names:
                    theirs = _layer_of_module(name)
                    if theirs not in ALLOWED[mine]:
                        offenders.append(f"{f.relative_to(REPO)}:{node.lineno} ({mine}) imports {name} ({theirs})")
    assert not offenders, "\n".join(offenders)


ROOMS = ("rewrite", "passes", "patterns", "kernels")


def _dist(name: str) -> str:
    """A distribution or import name in PEP 503 form (PyYAML -> pyyaml, compressed_tensors -> compressed-tensors)."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports() -> dict[str, str]:
    """Top-level module imported anywhere in the rooms (not stdlib, not spinfx) -> one file:line."""
    import ast

    found = {}
    for room in ROOMS:
        for f in sorted((REPO / room).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in (n.split(".")[0] for n in names):
                    if top not in sys.stdlib_module_names and top != "spinfx":
                        found.setdefault(top, f"{f.relative_to(REPO)}:{node.lineno}")
    return found


def _declared() -> tuple[set[str], set[str]]:
    """(core dependencies, core + every extra) as PEP 503 names, from pyproject.toml."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda req: _dist(re.match(r"[A-Za-z0-9._-]+", req).group(0))  # noqa: E731
    core = {name(r) for r in project["dependencies"]}
    extras = {name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return core, core | extras - {"spinfx"}


def test_every_third_party_import_is_declared_and_every_core_dependency_used():
    import importlib.metadata

    dists = importlib.metadata.packages_distributions()  # import name -> distributions providing it
    core, declared = _declared()
    imports = {top: {_dist(d) for d in dists.get(top, [top])} for top in _third_party_imports()}
    undeclared = {f"{top} ({where})" for top, where in _third_party_imports().items() if not imports[top] & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"
    used = set().union(*imports.values())
    assert not core - used, f"core dependencies never imported in {'/ '.join(ROOMS)}/: {sorted(core - used)}"
