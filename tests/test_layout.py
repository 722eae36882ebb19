"""The package's layout stays true: data flows one way through the layers, no import cycles, and
no file grows past one job (read with `ast`, nothing is imported)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Lower layers never import higher ones. Within a layer, imports are fine as long as they form
# no cycle. `errors`, `oserrors`, `atomic`, `runlock` and `devices` are leaves everything may use.
LAYERS = {
    "sra": 0, "sra.errors": 0, "sra.oserrors": 0, "sra.atomic": 0, "sra.runlock": 0,
    "sra.devices": 0,
    "sra.data": 1, "sra.models": 1, "sra.diffusion": 1, "sra.checkpoints": 1,
    "sra.objectives": 2, "sra.sampling": 2,
    "sra.training": 3, "sra.eval": 3, "sra.viz": 3, "sra.encoders": 3,
    "sra.compare": 3,
    "sra.commands": 4,
    "sra.cli": 5, "sra.__main__": 5,
}
MAX_LINES = 350  # a longer file must say in its docstring why it is one cohesive thing


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "sra").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every sra module ``name`` imports, at the top or inside functions (both are dependencies)."""
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the longest known module that is a prefix of the target
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("sra"):
                found.add(t)
    return found


def _layer(name: str) -> int:
    while name not in LAYERS:
        name = name.rpartition(".")[0]
    return LAYERS[name]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)  # KeyError names a module the map forgot


def test_no_import_from_a_higher_layer():
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert bad == []


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its own submodules is how packages work, not a cycle.
    def edges(a):
        return {b for b in graph[a] if not (a.startswith(b + ".") and b in graph)}

    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges(node)):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_files_do_one_job(name, path):
    text = path.read_text()
    lines = text.count("\n")
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert doc or path.name == "__init__.py", f"{name} has no module docstring saying its job"
    if lines > MAX_LINES:
        assert "cohesive" in doc.lower(), (
            f"{name} has {lines} lines; split it, or say in its docstring why it is one cohesive thing")
