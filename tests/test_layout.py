"""The package's layers: each module imports only from its own layer or those below, with no cycles; the
scripts import the package, never each other; no test file imports another."""

import ast
import graphlib
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "austen_gpt"
# from the bottom up; a module may import its own layer and those below
LAYERS = ["cli", "settings", "flags", "data", "models", "sampling", "style", "training", "serving"]
SCRIPTS = ["train.py", "inference.py", "dataset.py", "style_report.py", "export.py", "bench.py", "utils.py", "serve.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def package_files() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def package_imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports}."""
    return {
        module: {m for m in imported_modules(path) if m.startswith("austen_gpt.")}
        for module, path in package_files().items()
    }


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_package_module_belongs_to_a_layer():
    for module in package_imports():
        if module != "austen_gpt":
            assert module.split(".")[1] in LAYERS, f"{module} is in no layer; add it to LAYERS or move it"


def test_imports_go_down_the_layers_only():
    upward = [
        f"{module} imports {target}"
        for module, targets in package_imports().items()
        for target in targets
        if module != "austen_gpt" and layer(target) > layer(module)
    ]
    assert not upward, upward


def test_the_package_has_no_import_cycle():
    graph = package_imports()
    try:
        graphlib.TopologicalSorter(graph).static_order()
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_scripts_import_the_package_never_each_other():
    names = {script[:-3] for script in SCRIPTS}
    for script in SCRIPTS:
        assert not imported_modules(REPO / script) & names, f"{script} imports another script"


def test_no_test_file_imports_another():
    tests = {path.stem for path in (REPO / "tests").glob("test_*.py")}
    for path in (REPO / "tests").glob("*.py"):
        assert not imported_modules(path) & tests, f"{path.name} imports another test file"


# the modules that turn flags into settings; the rest of the package takes settings or plain values
FLAG_MODULES = {"austen_gpt.cli", "austen_gpt.settings", "austen_gpt.flags", "austen_gpt.training.flags"}


def test_library_code_never_takes_the_scripts_namespace():
    """Only the flag modules know argparse: a library function that took a Namespace could read any flag, and
    could not be called without faking a command line."""
    readers = {module for module, path in package_files().items() if "argparse" in imported_modules(path)}
    assert readers <= FLAG_MODULES, sorted(readers - FLAG_MODULES)
