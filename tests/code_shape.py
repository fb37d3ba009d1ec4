"""The package's shape, measured from its imports: modules and folders, import cycles, imports
that run up the layers, function-local imports of its own modules, private names imported
across modules, and the largest files. `tests/test_layout.py` holds the rules; this prints
the figures:

    python -m tests.code_shape [--layers layers.json]

`--layers` maps module paths (dotted, below `ptft_jax.`) to a layer name of LAYERS, for
measuring a tree whose modules are not yet in their folders.
"""
from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ptft_jax"

# Lower layers never import higher ones. A module's layer is its first folder below the
# package (a top-level module is its own name); equal ranks may not import each other either,
# except within one folder.
LAYERS = {"config": 0, "core": 1, "models": 2, "data": 2, "tasks": 3, "convert": 3,
          "ckpt": 4, "train": 5, "jobs": 6, "infer": 7, "bench": 8, "studies": 8, "cli": 9,
          "__main__": 9}


@dataclass
class Import:
    source: str     # the importing module, dotted below ptft_jax
    target: str     # the imported module
    names: tuple[str, ...]
    local: bool     # inside a function (or class body) rather than at module level
    line: int


@dataclass
class Shape:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def read(package: Path = PACKAGE) -> Shape:
    shape = Shape()
    for path in sorted(package.rglob("*.py")):
        shape.modules[module_name(path)] = path
    for name, path in shape.modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        _collect(tree, name, package_parts, shape, local=False)
    return shape


def _collect(node: ast.AST, source: str, package_parts: list[str], shape: Shape, local: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            continue  # annotations only: no import at run time
        inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name.split(".")[0] == "ptft_jax":
                    target = alias.name.removeprefix("ptft_jax").lstrip(".")
                    shape.imports.append(Import(source, target, (), local, child.lineno))
        elif isinstance(child, ast.ImportFrom):
            base = _resolve(child, package_parts)
            if base is None:
                continue
            for alias in child.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                if sub in shape.modules:  # `from ptft_jax.data import cache`: a module
                    shape.imports.append(Import(source, sub, (), local, child.lineno))
                else:
                    shape.imports.append(Import(source, base, (alias.name,), local,
                                                child.lineno))
        _collect(child, source, package_parts, shape, inner)


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(node: ast.ImportFrom, package_parts: list[str]) -> str | None:
    """The dotted module below ptft_jax that `from X import ...` names, or None if outside."""
    if node.level:
        base = package_parts[:len(package_parts) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    if node.module and node.module.split(".")[0] == "ptft_jax":
        return node.module.removeprefix("ptft_jax").lstrip(".")
    return None


def cycles(shape: Shape) -> list[list[str]]:
    """Strongly connected groups of modules (every import counts, local ones too: a
    function-local import hides a cycle, it does not break it). A package importing its own
    submodules (`__init__`) is left out."""
    graph: dict[str, set[str]] = {m: set() for m in shape.modules}
    for imp in shape.imports:
        if imp.target in graph and imp.target != imp.source and not \
                imp.source.startswith(imp.target + ".") and not \
                imp.target.startswith(imp.source + "."):
            graph[imp.source].add(imp.target)
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer(module: str, overrides: dict[str, str] | None = None) -> str:
    if overrides and module in overrides:
        return overrides[module]
    return module.split(".")[0]


def upward(shape: Shape, overrides: dict[str, str] | None = None) -> list[Import]:
    """Imports from a lower layer into a higher one, or across two folders of one rank."""
    out = []
    for imp in shape.imports:
        a, b = layer(imp.source, overrides), layer(imp.target, overrides)
        if a == b or a not in LAYERS or b not in LAYERS:
            continue
        if LAYERS[b] >= LAYERS[a]:
            out.append(imp)
    return out


def private_imports(shape: Shape) -> list[Import]:
    return [imp for imp in shape.imports if imp.target != imp.source and any(
        n.startswith("_") and not n.startswith("__") for n in imp.names)]


def local_imports(shape: Shape) -> list[Import]:
    return [imp for imp in shape.imports if imp.local]


def report(overrides: dict[str, str] | None = None) -> dict:
    shape = read()
    sizes = {m: len(p.read_text().splitlines()) for m, p in shape.modules.items()}
    folders = {p.parent for p in shape.modules.values()}
    return {
        "modules": sum(1 for p in shape.modules.values() if p.name != "__init__.py"),
        "folders": len(folders),
        "top_level_modules": sum(1 for m, p in shape.modules.items()
                                 if p.parent == PACKAGE and p.name != "__init__.py"),
        "import_cycles": cycles(shape),
        "upward_imports": [f"{i.source} -> {i.target}" for i in upward(shape, overrides)],
        "function_local_imports_of_own_modules": len(local_imports(shape)),
        "private_names_imported_across_modules": sorted(
            {f"{i.source} <- {i.target}: {', '.join(i.names)}" for i in private_imports(shape)}),
        "largest_files": sorted(((n, m) for m, n in sizes.items()), reverse=True)[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", help="JSON: {module: layer} for modules not yet placed")
    args = parser.parse_args()
    overrides = json.loads(Path(args.layers).read_text()) if args.layers else None
    print(json.dumps(report(overrides), indent=1))


if __name__ == "__main__":
    main()
