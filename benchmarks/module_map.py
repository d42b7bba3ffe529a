"""The package's module map: lines per module, the longest functions and classes.

    python -m benchmarks.module_map [PACKAGE_DIR]   # default: mlx_diffgemma

Spans are from the source's syntax tree (decorators excluded, docstrings included).
"""

import ast
import sys
from pathlib import Path


def module_map(root: Path):
    """([(module, lines)], [(lines, function)], [(lines, class)])."""
    rows, funcs, classes = [], [], []
    for path in sorted(root.rglob("*.py")):
        name = str(path.relative_to(root.parent))
        src = path.read_text()
        rows.append((name, len(src.splitlines())))
        for node in ast.walk(ast.parse(src)):
            span = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((span, f"{name}:{node.name}"))
            elif isinstance(node, ast.ClassDef):
                classes.append((span, f"{name}:{node.name}"))
    return rows, sorted(funcs, reverse=True), sorted(classes, reverse=True)


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "mlx_diffgemma")
    rows, funcs, classes = module_map(root)
    print(f"{len(rows)} modules, {sum(n for _, n in rows)} lines")
    for name, n in rows:
        print(f"{n:5d}  {name}")
    print("longest functions:", ", ".join(f"{f} ({n})" for n, f in funcs[:8]))
    print("longest classes:", ", ".join(f"{c} ({n})" for n, c in classes[:6]))


if __name__ == "__main__":
    main()
