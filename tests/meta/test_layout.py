"""The house holds its shape: layer boundaries, no import circles, small modules (read with `ast`, nothing imported).

- model/ holds weights and math: it never imports the engine, training or serving code;
  train/ never imports engine/ or serve/; engine/ never imports train/.
- no two modules import each other, directly or through others, counting imports inside
  functions too (a function-level import that breaks a circle is still a circle);
- no module is over 300 lines.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "recursa"
MAX_LINES = 300
FORBIDDEN = {"recursa.model": ("recursa.engine", "recursa.train", "recursa.serve", "recursa.cli"),
             "recursa.train": ("recursa.engine", "recursa.serve"),
             "recursa.engine": ("recursa.train",)}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = ("recursa",) + path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """recursa modules `name` imports anywhere in its file (a `from pkg import sub` counts sub)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_layer_boundaries():
    bad = [(m, dep) for m, deps in GRAPH.items() for layer, banned in FORBIDDEN.items()
           if m == layer or m.startswith(layer + ".") for dep in deps if dep.startswith(banned)]
    assert not bad, f"imports across layer boundaries: {bad}"


def test_no_import_circles():
    # package __init__ files re-export their submodules; edges into a package's own __init__ are not circles
    graph = {m: {d for d in deps if not (MODULES[d].name == "__init__.py")}
             for m, deps in GRAPH.items() if MODULES[m].name != "__init__.py"}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])
    assert not cycles, f"import circles: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(SRC.parent)} has {n} lines (> {MAX_LINES}): split it"


def test_the_checks_can_fail(tmp_path):
    """The walker sees function-level imports (what the old circles hid behind)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from recursa.engine.llm import LLM\n")
    assert "recursa.engine.llm" in _imports("recursa.model.x", f)
