"""The package's shape: folders that import one way, files small enough to read, a trainer that names no method.

The floors, bottom to top: `runtime.py`, then `network/`, `seekr/`, `evaluation/`, `engines/`, `methods/`,
`knowledge/`, `run/`.
A module imports only from its own folder and the floors below it; nothing in the package imports `tools/` or the
entry points; module imports have no cycles.
"""
import ast
from pathlib import Path

import pytest

import minseekr
from minseekr.methods.table import METHODS

PACKAGE = Path(minseekr.__file__).parent
FLOORS = ["runtime", "network", "seekr", "evaluation", "engines", "methods", "knowledge", "run"]
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module name `path` imports (a `from x import name` counts x and x.name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def imported(path: Path) -> set[str]:
    """The minseekr modules `path` imports (a `from minseekr.x import name` counts `minseekr.x.name` when that is a
    module)."""
    known = {dotted(p) for p in MODULES}
    return {n for n in imports(path) if n in known and n != "minseekr"}


def floor(module: str) -> int:
    return FLOORS.index(module.split(".")[1])


def test_every_module_lives_on_a_floor():
    assert {dotted(p).split(".")[1] for p in MODULES if dotted(p) != "minseekr"} == set(FLOORS)


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__init__.py" or p.parent != PACKAGE],
                         ids=lambda p: dotted(p))
def test_a_module_imports_only_its_own_floor_and_those_below(path):
    mine = dotted(path)
    upward = [m for m in imported(path) if floor(m) > floor(mine)]
    assert not upward, f"{mine} imports {upward}, above its floor"
    above = {n for n in imports(path) if n.split(".")[0] in ("tools", "train", "eval")}
    assert not above, f"{mine} imports {above}: the entry points stand on the package, never under it"


def test_module_imports_have_no_cycle():
    graph = {dotted(p): {m for m in imported(p)} for p in MODULES}
    state = {}

    def visit(m, trail):
        if state.get(m) == "open":
            raise AssertionError("import cycle: " + " → ".join(trail + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in graph.get(m, ()):
            visit(n, trail + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


@pytest.mark.parametrize("folder", FLOORS[1:])
def test_each_folder_says_what_lives_there(folder):
    """Its __init__'s docstring names every module in it and what the folder may import."""
    doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())) or ""
    for module in sorted((PACKAGE / folder).glob("*.py")):
        if module.name != "__init__.py":
            assert module.name in doc, f"{folder}/__init__.py does not say what {module.name} holds"
    assert "Imports:" in doc


@pytest.mark.parametrize("path", MODULES, ids=lambda p: dotted(p))
def test_files_stay_small_enough_to_read(path):
    """STYLE.md's budgets: a module ≤ 400 lines, a class ≤ 300, a function ≤ 80."""
    text = path.read_text()
    assert len(text.splitlines()) <= 400
    for node in ast.walk(ast.parse(text)):
        size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef):
            assert size <= 300, f"class {node.name} has {size} lines"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert size <= 80, f"{node.name} has {size} lines"


def test_the_trainer_names_no_method_and_asks_the_method_object():
    """Algorithm 1's loop calls the method protocol (methods/training.py): no method name, no PET branch."""
    source = (PACKAGE / "run" / "trainer.py").read_text()
    body = source[source.index("class ContinualTrainer"):]
    strings = {n.value for n in ast.walk(ast.parse(body)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & set(METHODS)
    assert ".pet" not in body and "isinstance(self.method" not in body


def test_the_public_api_is_importable_from_the_package():
    public = {"KVCache", "ModelArgs", "Tokenizer", "Transformer", "generate", "heads", "load_hf", "save_hf"}
    assert public <= set(minseekr.__all__) and all(hasattr(minseekr, name) for name in public)
