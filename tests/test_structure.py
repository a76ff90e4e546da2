"""The package's shape: imports flow one way, from cli down to errors (an import-linter contract
in pyproject.toml keeps the layers' order), with no cycle even through an import inside a function,
and the data layer starts without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import kaggle_vit

PACKAGE = Path(kaggle_vit.__file__).resolve().parent
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that an import statement of module `name` (at `path`) imports."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            anchor = package[:len(package) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        # `from package import module` imports the module; `from module import name`, the module
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return {target for target in targets if target in modules}


def import_graph() -> dict[str, set[str]]:
    """Each module's imports of the package's modules: every import statement, at the top of the
    file or inside a function, relative ones resolved."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        nodes = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = set().union(*(_imported(n, name, path, modules) for n in nodes)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    return next((cycle for module in sorted(graph) if module not in state and (cycle := visit(module))), None)


def test_no_import_cycle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _marked(lines: list[str], node: ast.stmt) -> bool:
    """Whether an import carries `# lazy: why` on its lines or in the comments and imports just above it."""
    if any("# lazy:" in line for line in lines[node.lineno - 1:node.end_lineno]):
        return True
    row = node.lineno - 2
    while row >= 0 and lines[row].strip().startswith(("#", "from ", "import ")):
        if "# lazy:" in lines[row]:
            return True
        row -= 1
    return False


def test_every_import_inside_a_function_says_why_it_is_lazy():
    unmarked = []
    for path in _modules().values():
        text = path.read_text(encoding="utf-8")
        lines, tree = text.splitlines(), ast.parse(text)
        for function in (n for n in ast.walk(tree) if isinstance(n, FUNCTIONS)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not _marked(lines, node):
                    unmarked.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not unmarked, "imports inside functions without a `# lazy: why` comment: " + ", ".join(sorted(set(unmarked)))


def test_the_data_layer_imports_no_torch():
    data = sorted(name for name in _modules() if name == "kaggle_vit.data" or name.startswith("kaggle_vit.data."))
    code = ("import importlib, sys\n"
            f"for name in {data!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'timm', 'albumentations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(data) > 1 and out.stdout.strip() == "[]", out.stdout


def test_every_subpackage_is_installed():
    # pyproject.toml lists the packages `pip install` copies: a subpackage left out would be missing
    # from an installed kaggle-vit (and from a wheel), though the checkout's tests still import it
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert packages <= listed, sorted(packages - listed)
