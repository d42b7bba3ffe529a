"""Imports inside mlx_diffgemma point down only, as read from the package's own source.

Every module is parsed (function-level and TYPE_CHECKING imports included), plus the
imports made by name at run time (`cli.COMMANDS`, the package's `_EXPORTS`). The graph
must be acyclic, so it orders the modules into layers by itself; nothing but
`__main__` may import `cli`, and nothing imports `__main__`.
"""

import ast
import shutil
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mlx_diffgemma"
NAME = "mlx_diffgemma"


def _modules(package: Path) -> Dict[str, Path]:
    """Dotted module name (relative to the package) -> file; the package is `__init__`,
    a subpackage is named by its folder (`server`)."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(modules: Dict[str, Path], parts: List[str]) -> str:
    """The module an import of `parts` (relative to the package) reaches."""
    while parts and ".".join(parts) not in modules:
        parts = parts[:-1]  # an attribute of a module, not a module
    return ".".join(parts) or "__init__"


def _static_imports(modules: Dict[str, Path], name: str) -> Set[str]:
    path = modules[name]
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else []
    if path.name != "__init__.py":
        package = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == NAME or alias.name.startswith(NAME + "."):
                    found.add(_resolve(modules, alias.name.split(".")[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith(NAME):
                    continue
                base = node.module.split(".")[1:]
            else:
                if node.level - 1 > len(package):
                    raise AssertionError(f"{path}: an import reaches outside the package")
                up = package[: len(package) - (node.level - 1)]
                base = up + (node.module.split(".") if node.module else [])
            found |= {_resolve(modules, base + [alias.name]) for alias in node.names}
    return found


def _dict_literal(path: Path, name: str) -> dict:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path.name} has no {name} literal")


def import_graph(package: Path) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (itself excluded)."""
    modules = _modules(package)
    graph = {m: _static_imports(modules, m) for m in modules}
    # Imported by name at run time.
    graph["cli"] |= {
        module for module, *_ in _dict_literal(package / "cli.py", "COMMANDS").values()
    }
    graph["__init__"] |= set(_dict_literal(package / "__init__.py", "_EXPORTS").values())
    return {m: deps - {m} for m, deps in graph.items()}


def layers(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Modules by layer, lowest first (Kahn's algorithm); raises on a cycle."""
    left = {m: set(deps) for m, deps in graph.items()}
    out = []
    while left:
        ready = sorted(m for m, deps in left.items() if not deps)
        if not ready:
            raise ValueError(f"import cycle among {sorted(left)}: {left}")
        out.append(ready)
        for m in ready:
            del left[m]
        for deps in left.values():
            deps.difference_update(ready)
    return out


def layering_problems(package: Path) -> List[str]:
    graph = import_graph(package)
    problems = [
        f"{m} imports cli" for m, deps in graph.items() if "cli" in deps and m != "__main__"
    ]
    problems += [
        f"{m} imports {d}" for m, deps in graph.items() for d in deps if d.endswith("__main__")
    ]
    try:
        layers(graph)
    except ValueError as e:
        problems.append(str(e))
    return problems


def test_imports_point_down():
    assert layering_problems(PACKAGE) == []
    order = [m for layer in layers(import_graph(PACKAGE)) for m in layer]
    # Sanity of the derivation itself: the known chain sits in this order.
    chain = [
        "diffusion.config",
        "model",
        "loader",
        "generate",
        "tasks.infill",
        "infill",
        "cli",
        "__main__",
    ]
    assert sorted(chain, key=order.index) == chain


def test_a_bad_import_is_caught(tmp_path):
    copy = tmp_path / NAME
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert layering_problems(copy) == []
    # A function-level import of the CLI, and one from a layer above (a cycle).
    with open(copy / "diffusion" / "sampler.py", "a") as f:
        f.write(
            "\n\ndef _bad():\n    from ..cli import main\n    from ..generate import generate\n"
        )
    problems = layering_problems(copy)
    assert "diffusion.sampler imports cli" in problems
    assert any(p.startswith("import cycle among") and "'diffusion.sampler'" in p for p in problems)


def test_the_exact_loop_knows_nothing_of_fast_mode():
    graph = import_graph(PACKAGE)
    assert graph["diffusion.loop"] == {
        "diffusion.sampler",
        "diffusion.canvas",
        "diffusion.config",
        "diffusion.lanes",
    }
    assert "diffusion.loop" in graph["diffusion.fast"]
