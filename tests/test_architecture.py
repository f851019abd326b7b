"""The package's shape (issue 12): `import vlmsae` loads no testbed module and no optional peer library, the
modules form a DAG, imports flow one way (core <- analysis <- testbed, and vlmsae.integrations on top), and no
module uses another module's private names.

The import graph is read from the source (the AST of every module under vlmsae/), not from a running
interpreter, so an import inside a function counts as much as one at the top: a lazy import hides a
cycle from the interpreter but not from a reader, and a cycle it hides comes back when someone hoists it.
An edge goes to the module that defines the imported name (`from .x import f` -> x; `from . import x`
-> x). Not counted: the parent packages an import runs implicitly (every module would depend on
vlmsae/__init__.py, which re-exports the API) and `importlib.import_module` calls, which vlmsae uses
only in the deprecation `__getattr__` of vlmsae/testbed/__init__.py.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import vlmsae

PACKAGE = Path(vlmsae.__file__).parent
ANALYSIS = {"vlmsae.analysis", "vlmsae.probes", "vlmsae.plots", "vlmsae.dashboard", "vlmsae.explain", "vlmsae.export"}
TOP = {"vlmsae", "vlmsae.__main__", "vlmsae.cli"}  # the API and the command sit on all three layers
PEERS = ("nnsight", "transformer_lens", "accelerate")  # optional extras: only vlmsae.integrations may import them
SHIMS = {"vlmsae.shapes", "vlmsae.concepts", "vlmsae.demo"}  # old paths of testbed modules, for one release
# Edges against the flow, each with its reason (remove the entry with the reason).
AGAINST_THE_FLOW = {("vlmsae.data", "vlmsae.testbed.data")}  # vlmsae.data.ShapesData's deprecation __getattr__
# Private names still used across modules, each with its reason (remove the entry with the reason).
PRIVATE_USES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def imports(module: str) -> list[tuple[str, str | None, str]]:
    """``(target module, imported name or None, local name)`` for every import statement in ``module``, wherever
    it sits: ``import a.b`` gives ``("a.b", None, "a")``, ``from .x import f as g`` ``("vlmsae.x", "f", "g")``."""
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, alias.asname or alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = node.module if not node.level else ".".join(filter(None, [base, node.module]))
            found += [(target, alias.name, alias.asname or alias.name) for alias in node.names]
    return found


def edges(module: str) -> set[str]:
    """The vlmsae modules that ``module`` imports."""
    out = set()
    for target, name, _ in imports(module):
        if name is not None and f"{target}.{name}" in MODULES:
            out.add(f"{target}.{name}")  # from package import submodule
        elif target in MODULES:
            out.add(target)
    return out - {module}


GRAPH = {module: edges(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None if it is acyclic (depth-first search)."""
    state, path = {}, []  # state: 1 on the current path, 2 finished

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> int:
    if module in TOP or module.startswith("vlmsae.integrations"):
        return 3
    if module.startswith("vlmsae.testbed") or module in SHIMS:
        return 2
    return 1 if module in ANALYSIS else 0


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(module: str) -> set[tuple[str, str]]:
    """``(module, "other._name")`` for each private name of another vlmsae module that ``module`` uses:
    imported (``from .x import _f``), read off a module (``x._f``), or read off an object of another
    module's class (``obj._sums``, where only another module assigns or defines ``_sums``)."""
    bound, found = {}, set()  # local name -> the vlmsae module it is bound to
    for target, name, local in imports(module):
        if target not in MODULES:
            continue
        if name is not None and is_private(name):
            found.add((module, f"{target}.{name}"))
        if name is not None and f"{target}.{name}" in MODULES:
            bound[local] = f"{target}.{name}"
        elif name is None:
            bound[local] = target if local != target.partition(".")[0] else local
    for node in ast.walk(TREES[module]):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
            continue
        owner = dotted(node.value, bound)
        if owner in MODULES and owner != module:
            found.add((module, f"{owner}.{node.attr}"))
        elif not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            owners = [m for m, names in PRIVATE_ATTRIBUTES.items() if node.attr in names]
            if owners and module not in owners:
                found.add((module, f"{owners[0]}.{node.attr}"))
    return found


def dotted(node: ast.AST, bound: dict[str, str]) -> str | None:
    """The vlmsae module an expression like ``x`` or ``vlmsae.hooks`` names, if any."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, bound)
        return f"{base}.{node.attr}" if base else None
    return None


def defined_private_attributes(module: str) -> set[str]:
    """Private attribute names a module's classes own: ``self._x = ...`` and ``def _x`` in a class body."""
    names = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and is_private(node.attr) \
                and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
        if isinstance(node, ast.ClassDef):
            names |= {item.name for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_private(item.name)}
    return names


PRIVATE_ATTRIBUTES = {module: defined_private_attributes(module) for module in MODULES}


def fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter that imports this vlmsae."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_import_vlmsae_loads_no_testbed_module():
    """In a fresh interpreter: the library and its analysis layer load without the Shapes testbed or its old paths."""
    loaded = fresh_python(f"import sys, vlmsae\nprint(sorted(m for m in sys.modules "
                          f"if m.startswith('vlmsae.testbed') or m in {sorted(SHIMS)}))")
    assert loaded == "[]", f"import vlmsae loaded {loaded}"


def test_import_vlmsae_loads_no_optional_peer():
    """In a fresh interpreter: `import vlmsae` imports none of the libraries of its extras (nnsight, TransformerLens,
    accelerate), so a user without them can use everything but the integrations."""
    loaded = fresh_python(f"import sys, vlmsae\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {PEERS}))")
    assert loaded == "[]", f"import vlmsae loaded {loaded}"


def test_only_the_integrations_import_the_extras():
    """An extra's library is imported (at the top or lazily) by vlmsae.integrations alone, and nothing but the
    integrations imports vlmsae.integrations: the core and analysis work without any extra."""
    peers = {(m, target) for m in MODULES for target, _, _ in imports(m) if target.split(".")[0] in PEERS}
    assert peers and all(m.startswith("vlmsae.integrations") for m, _ in peers), sorted(peers)
    users = {a for a, targets in GRAPH.items() for b in targets if b.startswith("vlmsae.integrations")}
    assert all(a.startswith("vlmsae.integrations") for a in users), sorted(users)


def test_the_graph_sees_imports_at_every_level():
    """The graph is what this file says: a lazy import and a relative import from a subpackage are edges."""
    assert "vlmsae.testbed.demo" in GRAPH["vlmsae.cli"]  # inside demo_command()
    assert {"vlmsae.errors", "vlmsae.testbed.shapes", "vlmsae.testbed.models"} <= GRAPH["vlmsae.testbed.concepts"]
    assert "vlmsae.metrics" in GRAPH["vlmsae.trainer"]  # from vlmsae import metrics
    assert len(MODULES) > 30 and "vlmsae.testbed" in MODULES


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_flow_one_way():
    """core <- analysis <- testbed: no module imports one of a later layer (the API and the command import all)."""
    against = {(a, b) for a, targets in GRAPH.items() for b in targets if layer(a) < layer(b)}
    assert against == AGAINST_THE_FLOW


def test_no_module_uses_another_modules_private_names():
    found = set().union(*(private_uses(module) for module in MODULES))
    assert found == PRIVATE_USES


def test_old_paths_still_work_with_a_deprecation_warning():
    """``vlmsae.shapes``, ``vlmsae.concepts``, ``vlmsae.demo``, ``vlmsae.data.ShapesData`` and the names of the
    old ``vlmsae.testbed`` module give the objects at their new homes, each with a DeprecationWarning."""
    code = """
import warnings
import vlmsae.testbed.concepts, vlmsae.testbed.data, vlmsae.testbed.demo, vlmsae.testbed.models
from vlmsae import testbed
olds = {"shapes": "from vlmsae import shapes as old", "concepts": "import vlmsae.concepts as old",
        "demo": "from vlmsae.demo import run as old", "data": "from vlmsae.data import ShapesData as old",
        "models": "old = testbed.load_captioner"}
news = {"shapes": testbed.shapes, "concepts": testbed.concepts, "demo": testbed.demo.run,
        "data": testbed.data.ShapesData, "models": testbed.models.load_captioner}
for key, statement in olds.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(statement)
    assert old is news[key], key
    assert [w.category for w in caught] == [DeprecationWarning] and "moved to" in str(caught[0].message), key
print("ok")
"""
    assert fresh_python(code) == "ok"
