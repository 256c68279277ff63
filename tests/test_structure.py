"""The package's import structure: three wings with imports one way (training -> cnf -> ode), a
self-contained ``kernels`` package, no import cycle and nothing but the public face in the root."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastcnf"
KERNELS = ROOT / "kernels"
WING_ORDER = {"ode": 0, "cnf": 1, "training": 2}  # a wing may import the wings below it only
ROOT_MODULES = {"__init__", "__main__", "errors", "stats"}


def _module_name(path):
    if path.is_relative_to(KERNELS):
        parts = ("fastcnf", "kernels") + path.relative_to(KERNELS).with_suffix("").parts
    else:
        parts = ("fastcnf",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    files = sorted(PACKAGE.rglob("*.py")) + sorted(KERNELS.rglob("*.py"))
    return {_module_name(path): path for path in files}


EXTENSIONS = {"fastcnf._C"}  # compiled modules: no source to read


def _runs_at_import(tree):
    """ids of the nodes outside every function body (what runs when the module is imported)."""
    ids = set()

    def visit(node):
        ids.add(id(node))
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child)

    visit(tree)
    return ids


def _imports(name, path, modules):
    """(imported module, at import time?) for every import in the file, resolved to a module of ours."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = _runs_at_import(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            if target in EXTENSIONS:
                break
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, id(node) in top_level))
    for call in ast.walk(tree):  # importlib.import_module("fastcnf....") with a literal name
        if isinstance(call, ast.Constant) and isinstance(call.value, str) and call.value in modules:
            found.append((call.value, False))
    return found


def _wing(module):
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] == "kernels":
        return "kernels"
    return parts[1] if parts[1] in WING_ORDER else "root"


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def test_the_root_holds_only_the_public_face():
    assert {path.stem for path in PACKAGE.glob("*.py")} == ROOT_MODULES
    folders = {path.name for path in PACKAGE.iterdir()
               if path.is_dir() and not path.is_symlink() and path.name != "__pycache__"}
    assert folders == set(WING_ORDER)  # (a fastcnf/kernels link to kernels/ may exist in a second checkout)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_one_way(module):
    wing = _wing(module)
    for target, _ in GRAPH[module]:
        target_wing = _wing(target)
        if wing == "kernels":
            assert target_wing == "kernels", f"{module} imports {target}: kernels/ imports nothing from fastcnf"
        elif wing in WING_ORDER and target_wing in WING_ORDER:
            assert WING_ORDER[target_wing] <= WING_ORDER[wing], f"{module} ({wing}) imports {target} ({target_wing})"
        elif wing == "root" and module not in ("fastcnf", "fastcnf.__main__"):
            assert target_wing == "root", f"{module} (package root) imports {target}"


def test_no_import_cycle():
    """Module-level imports (those that run when a module is imported) form no cycle."""
    edges = {name: sorted({target for target, at_import in imports if at_import}) for name, imports in GRAPH.items()}
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in edges.get(node, ()):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_walk_sees_real_edges():
    """The checks above read something: known edges of each kind are found."""
    assert ("fastcnf.ode.adjoint", True) in GRAPH["fastcnf.cnf.flow"]
    assert ("fastcnf.cnf.flow", True) in GRAPH["fastcnf.training.training_methods"]
    assert ("fastcnf.kernels.rk_stage", False) in GRAPH["fastcnf.ode.control.triton"]
    assert ("fastcnf.kernels.hutchinson", False) in GRAPH["fastcnf.cnf.divergence"]
