"""The package's layering holds (tests/code_shape.py reads it from the imports): no import
cycles, no import from a lower layer into a higher one, no private name imported across
modules, and no module at the top of the package but the command line."""
import re
import subprocess
from pathlib import Path

from tests import code_shape


def test_no_import_cycles():
    assert code_shape.cycles(code_shape.read()) == []


def test_lower_layers_never_import_higher_ones():
    shape = code_shape.read()
    unplaced = sorted({code_shape.layer(m) for m in shape.modules} - set(code_shape.LAYERS)
                      - {""})
    assert unplaced == [], f"folders without a layer in code_shape.LAYERS: {unplaced}"
    assert [f"{i.source} -> {i.target} (line {i.line})"
            for i in code_shape.upward(shape)] == []


def test_no_private_name_is_imported_across_modules():
    assert [f"{i.source} <- {i.target}: {', '.join(i.names)}"
            for i in code_shape.private_imports(code_shape.read())] == []


def test_only_the_command_line_sits_at_the_top():
    shape = code_shape.read()
    top = sorted(m for m, p in shape.modules.items()
                 if p.parent == code_shape.PACKAGE and p.name != "__init__.py")
    assert top == ["cli"]


def test_the_checks_see_a_violation():
    # The reader must be able to fail: a made-up upward import and a cycle are caught.
    shape = code_shape.read()
    shape.imports.append(code_shape.Import("models.layers", "train.loop", ("run",), False, 1))
    shape.imports.append(code_shape.Import("train.loop", "models.layers", ("dense",), False, 1))
    assert any(i.source == "models.layers" for i in code_shape.upward(shape))
    assert any({"models.layers", "train.loop"} <= set(c) for c in code_shape.cycles(shape))


def test_only_the_command_line_imports_inside_functions():
    # cli.py defers each command's imports (start-up time, said at its top); anywhere else a
    # function-local import of the package's own module hides a cycle or an upward arrow.
    assert [f"{i.source} line {i.line}: {i.target}"
            for i in code_shape.local_imports(code_shape.read()) if i.source != "cli"] == []


def test_every_module_and_file_the_repository_names_exists():
    # After a move, a dotted name in a subprocess command or a path in a comment, a config or
    # the README can still name the old place: every dotted module name of the package, and
    # every path of a Python file or config under the package, benchmarks, tests or configs
    # folders, must exist.
    root = code_shape.PACKAGE.parent
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, text=True, check=True).stdout.split()
    missing = set()
    for name in tracked:
        path = root / name
        if path.suffix in (".png", ".gz", ".npz", ".npy") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for m in re.finditer(r"\bptft_jax((?:\.[A-Za-z_]\w*)+)", text):
            parts = m.group(1).strip(".").split(".")
            if not any((root / "ptft_jax" / Path(*parts[:k])).with_suffix(".py").is_file()
                       or (root / "ptft_jax" / Path(*parts[:k]) / "__init__.py").is_file()
                       for k in range(1, len(parts) + 1)) and parts[0] != "__file__":
                missing.add(f"{name}: {m.group(0)}")
        for m in re.finditer(r"\b(?:ptft_jax|benchmarks|tests|configs)/[\w/.-]+\.(?:py|yaml)",
                             text):
            if not (root / m.group(0)).exists():
                missing.add(f"{name}: {m.group(0)}")
    assert sorted(missing) == []
