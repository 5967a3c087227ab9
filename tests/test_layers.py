"""The layer rules, checked on the source: no package imports one above it.

    python -m pytest tests/test_layers.py -q

    kernels   imports nothing of ours but kernels itself
    engine    imports kernels (and itself); never eval, recipes or bench
    eval      imports engine and kernels; never recipes or bench
    recipes   imports engine, kernels and eval; never bench
    bench     imports anything (it sits apart, on top)

Every .py under those packages is parsed with `ast` (never imported), and every import is looked at: top-level,
inside functions, relative ones, and `importlib.import_module("literal")` / `__import__("literal")` calls. A lazy
import by a string handed to something else (engine/cli.py's "recipes.distill:cli_distill" targets) is not an
import of that module by the file and is not checked. A failure names file:line and the offending import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("engine", "kernels", "eval", "recipes", "bench")
FORBIDDEN = {                                        # package -> the packages of ours it must not import
    "kernels": {"engine", "eval", "recipes", "bench"},
    "engine": {"eval", "recipes", "bench"},
    "eval": {"recipes", "bench"},
    "recipes": {"bench"},
    "bench": set(),
}


def _module_of(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(source: str, path: Path, root: Path):
    """(line, dotted module name) for every import in `source` (the file at `path` under `root`)."""
    here = _module_of(path, root)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                       # relative: resolve against this file's package
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod:
                yield node.lineno, mod
            else:                                                # `from .. import bench`: the names are modules
                for alias in node.names:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                arg = node.args[0]
                if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                    arg = arg.values[0]                          # f"eval.benchmarks.{x}": its constant head
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value


def violations(root: Path = ROOT) -> list[str]:
    """'file:line: <package> imports <module>' for every import that points up a layer."""
    found = []
    for pkg, banned in FORBIDDEN.items():
        for path in sorted((root / pkg).rglob("*.py")):
            for line, mod in imported_modules(path.read_text(), path, root):
                top = mod.split(".")[0]
                if top in banned:
                    found.append((str(path.relative_to(root)), line, f"{pkg} imports {mod}"))
    return [f"{file}:{line}: {what}" for file, line, what in sorted(set(found))]


def test_no_upward_imports():
    bad = violations()
    assert not bad, "upward imports (see the layer rules in tests/test_layers.py):\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg, source, offender", [
    ("engine", "import eval.harness\n", "eval.harness"),
    ("engine", "def f():\n    from recipes.common import x\n", "recipes.common"),
    ("engine", "class A:\n    def m(self):\n        import bench.common as c\n", "bench.common"),
    ("kernels", "from engine import config\n", "engine"),
    ("kernels", "def f():\n    import importlib\n    return importlib.import_module('engine.config')\n", "engine.config"),
    ("eval", "from recipes import distill\n", "recipes"),
    ("eval", "def f(n):\n    return __import__(f'bench.{n}')\n", "bench."),
    ("recipes", "from ..bench import common\n", "bench"),
])
def test_a_planted_upward_import_is_found(tmp_path, pkg, source, offender):
    """The check is not vacuous: each kind of upward import, planted in a copy of the layout, is reported with its
    file and line."""
    for p in OURS:
        (tmp_path / p).mkdir()
    path = tmp_path / pkg / "planted.py"
    path.write_text(source)
    bad = violations(tmp_path)
    line = source.count("\n", 0, source.index(offender.split(".")[0])) + 1
    assert bad and all(str(path.relative_to(tmp_path)) in b for b in bad), bad
    assert any(f":{line}: {pkg} imports {offender}" in b for b in bad), bad


def test_allowed_imports_are_not_reported(tmp_path):
    """Downward and same-layer imports, and a lazy target held as a plain string, pass."""
    for p in OURS:
        (tmp_path / p).mkdir()
    (tmp_path / "engine" / "ok.py").write_text("from engine import lora\nfrom kernels.multi_lora import x\n"
                                                "TARGET = 'recipes.distill:cli_distill'\n")
    (tmp_path / "eval" / "ok.py").write_text("from engine.agents.problem import Problem\nfrom . import harness\n")
    (tmp_path / "recipes" / "ok.py").write_text("import eval.run\nfrom engine import hub\n")
    (tmp_path / "bench" / "ok.py").write_text("import recipes.distill\nimport eval.run\n")
    (tmp_path / "kernels" / "ok.py").write_text("from kernels import multi_lora\nimport torch\n")
    assert violations(tmp_path) == []
