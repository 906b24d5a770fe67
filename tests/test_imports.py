"""The import graph: every interp module imports on its own, and no module imports itself back.

Each module is imported first in a fresh interpreter (a cycle that only bites when a module is
imported first fails there), and the graph of interp → interp imports — top-level and
function-level alike, with a package's ``__init__`` counted as imported by its submodules'
importers — must have no cycle. Exception classes all derive from ``InterpError``.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "interp"


def _modules() -> list[str]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


MODULES = _modules()
# A function-level import inside interp/adapters (fold_static_update reads the router's type);
# adapters/ is being rewritten on another branch, which owns removing this edge. Module-level
# imports are checked without exception.
KNOWN_LAZY_EDGES = {("interp.adapters.hooks", "interp.adapters.route")}


def _file(mod: str) -> Path:
    p = ROOT / Path(*mod.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def _imports(mod: str, top_level_only: bool = False) -> set[str]:
    """interp modules that ``mod`` imports (anywhere in the file, or only at module level), plus
    their parent packages."""
    tree = ast.parse(_file(mod).read_text())
    names: set[str] = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    out = set()
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[:i])
            # a package's own __init__ runs before its submodules: not an edge back from them
            if cand in MODULES and not mod.startswith(cand + ".") and cand != mod:
                out.add(cand)
    return out


@pytest.mark.parametrize("top_level_only", [True, False])
def test_no_import_cycle(top_level_only):
    graph = {m: _imports(m, top_level_only) - {n for a, n in KNOWN_LAZY_EDGES if a == m and not top_level_only}
             for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


def test_every_module_imports_alone():
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k == 'interp' or k.startswith('interp.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(m)\n")
    # one interpreter per module would take minutes (torch import); a module imported first after
    # every interp module is dropped from sys.modules meets the same partially-initialised state
    proc = subprocess.run([sys.executable, "-c", code, *MODULES], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_exception_class_derives_from_interp_error():
    import importlib
    import inspect

    from interp.errors import InterpError

    seen = []
    for m in MODULES:
        if m == "interp.cli":
            continue
        mod = importlib.import_module(m)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__.startswith("interp"):
                seen.append(name)
                assert issubclass(obj, InterpError), f"{m}.{name} does not derive from InterpError"
    assert {"AdapterError", "ConfigError", "MergeError", "StudyError", "SubspaceError",
            "UnsupportedHookError", "WorldError"} <= set(seen)
