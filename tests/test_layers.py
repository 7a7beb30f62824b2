"""Code structure: imports only point down the layers, and functions fit on a screen.

The layers, lowest first (docs/design.md): a module may import its own layer and
those below, never above. runtime/ (runs model files) and export/ (writes them)
share what both need through formats/, below both, and never import each other.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retinanet"

# Layer of each top-level module or subpackage of retinanet.
LAYERS = {
    "errors": 0,
    "config": 0,
    "files": 1,
    "images": 1,
    "jpeg": 1,
    "ops": 2,
    "draw": 2,
    "model": 3,
    "checkpoint": 4,
    "data": 4,
    "formats": 4,
    "distributed": 4,
    "video": 4,
    "evaluate": 4,
    "runtime": 5,
    "export": 5,
    "convert": 5,
    "infer": 6,
    "infer_video": 6,
    "train": 7,
    "cli": 8,
    "__main__": 9,
}
# The package's own __init__ re-exports the Python API (retinanet.load, Detector).
TOP_LEVEL_API = {"runtime", "draw"}
MAX_FUNCTION_LINES = 80
# Functions allowed to be longer, with the reason.
LONG_FUNCTIONS: dict[str, str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["retinanet", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


KNOWN = set(modules())


def imported(name: str, path: Path) -> set[str]:
    """Every retinanet module `name` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports the module x when there is one, else a name of the package.
            submodules = {f"{target}.{a.name}" for a in node.names} & (KNOWN | {"retinanet._C"})
            found.update(submodules or {target})
    return {m for m in found if m == "retinanet" or m.startswith("retinanet.")}


def unit(module: str) -> str:
    """The top-level module or subpackage a retinanet module belongs to ('' for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_edges() -> list[tuple[str, str]]:
    edges = []
    for name, path in modules().items():
        for target in imported(name, path):
            if target in KNOWN or target == "retinanet._C":
                edges.append((name, target))
    return edges


def test_every_unit_has_a_layer():
    units = {unit(m) for m in modules()} - {""}
    assert units == set(LAYERS), units ^ set(LAYERS)


def test_imports_only_point_down():
    upward = []
    for source, target in import_edges():
        s, t = unit(source), unit(target)
        if s == "":
            assert t in TOP_LEVEL_API or t == "", (source, target)
            continue
        if t in ("", "_C"):
            assert source == "retinanet.ops" and t == "_C", f"{source} imports {target}"
            continue
        if LAYERS[t] > LAYERS[s]:
            upward.append(f"{source} -> {target}")
    assert not upward, upward


def test_runtime_and_export_never_import_each_other():
    crossing = [(s, t) for s, t in import_edges() if {unit(s), unit(t)} == {"runtime", "export"}]
    assert not crossing, crossing


def test_ops_import_nothing_above_them():
    above = [(s, t) for s, t in import_edges() if unit(s) == "ops" and unit(t) not in ("ops", "_C", "config", "errors")]
    assert not above, above


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph test reads relative imports, function-local ones and `from . import x` alike."""
    fake = tmp_path / "retinanet" / "ops"
    fake.mkdir(parents=True)
    source = fake / "box.py"
    source.write_text("def f():\n    from ..runtime import tensorrt\n    from .. import train\n")
    assert imported("retinanet.ops.box", source) == {"retinanet.runtime.tensorrt", "retinanet.train"}
    edges = [("retinanet.ops.box", t) for t in sorted(imported("retinanet.ops.box", source))]
    assert [LAYERS[unit(t)] > LAYERS[unit(s)] for s, t in edges] == [True, True]


def test_functions_fit_on_a_screen():
    long = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        stack = [(tree, name)]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualname = f"{prefix}.{child.name}"
                    lines = child.end_lineno - child.lineno + 1
                    if not isinstance(child, ast.ClassDef) and lines > MAX_FUNCTION_LINES:
                        long[qualname] = lines
                    stack.append((child, qualname))
    assert set(long) == set(LONG_FUNCTIONS), long
