"""The layer rules, checked on the source: no package imports one above it, engine's wings point one way, and no
module imports itself round a loop.

    python -m pytest tests/test_layers.py -q

    kernels   imports nothing of ours but kernels itself
    engine    imports kernels (and itself); never eval, recipes or bench
    eval      imports engine and kernels; never recipes or bench
    recipes   imports engine, kernels and eval; never bench
    bench     imports anything (it sits apart, on top)

Inside engine, the wings (WINGS, bottom to top; a wing imports only itself and the wings on lower rows):

    core      engine/*.py: config, config_file, errors, roles, model, lora, kv_cache
    cpu       engine/cpu/: packed weights, the C kernels, the modules swapped into a packed model
    loading   engine/loading/: hub, weights, GGUF header, tokenizer, export, the packed-model loader
    training  engine/training/      serving  engine/serving/      (side by side: neither imports the other)
    agents    engine/agents/
    cli       engine/cli.py, on top

Circles: the graph of every import between our modules (engine, kernels, eval, recipes, bench) has no cycle; a
circle makes its files one room. A failure names the files round it, each with the line of its import.

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


def imports(source: str, path: Path, root: Path):
    """(line, dotted module name, names taken from it) for every import in `source` (the file at `path` under
    `root`); names is empty but for `from module import names`."""
    here = _module_of(path, root)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                       # relative: resolve against this file's package
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod:
                yield node.lineno, mod, tuple(alias.name for alias in node.names)
            else:                                                # `from .. import bench`: the names are modules
                for alias in node.names:
                    yield node.lineno, alias.name, ()
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                arg = node.args[0]
                if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                    arg = arg.values[0]                          # f"eval.benchmarks.{x}": its constant head
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value, ()


def imported_modules(source: str, path: Path, root: Path):
    """(line, dotted module name) for every import in `source` (the file at `path` under `root`)."""
    for line, mod, _ in imports(source, path, root):
        yield line, mod


def our_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: its file} for every .py of OURS under `root` (a package is its __init__.py)."""
    return {".".join(_module_of(path, root)): path for pkg in OURS for path in sorted((root / pkg).rglob("*.py"))}


def resolved_imports(path: Path, root: Path, modules: dict[str, Path]):
    """(line, module) for every import of the file at `path`, `from a import b` resolved to a.b when that is one of
    `modules` (else a: b is a name in a)."""
    for line, target, names in imports(path.read_text(), path, root):
        target = target.rstrip(".")                              # an f-string's constant head: "eval.benchmarks."
        for t in [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]:
            yield line, t


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


# --- engine's wings -----------------------------------------------------------------------------------------------
WINGS = [("core",), ("cpu",), ("loading",), ("training", "serving"), ("agents",), ("cli",)]    # bottom to top
RANK = {wing: i for i, row in enumerate(WINGS) for wing in row}


def wing_of(module: str) -> str | None:
    """engine.cpu.kernels -> "cpu", engine.model -> "core", engine.cli -> "cli"; None outside engine."""
    parts = module.split(".")
    if parts[0] != "engine":
        return None
    if len(parts) > 1 and parts[1] in RANK and parts[1] != "core":
        return parts[1]
    return "core"


def wing_violations(root: Path = ROOT) -> list[str]:
    """'file:line: <wing> imports <module> (<its wing>)' for every import of engine by engine that points up a row of
    WINGS or across one (training and serving do not import each other)."""
    found, modules = [], our_modules(root)
    for mod_here, path in modules.items():
        here = wing_of(mod_here)
        if here is None:
            continue
        for line, mod in resolved_imports(path, root, modules):
            there = wing_of(mod)
            if there is not None and there != here and RANK[there] >= RANK[here]:
                found.append(f"{path.relative_to(root)}:{line}: {here} imports {mod} ({there})")
    return sorted(set(found))


def test_engine_wings_point_one_way():
    bad = wing_violations()
    assert not bad, "imports up (or across) engine's wings (see WINGS in tests/test_layers.py):\n" + "\n".join(bad)


# --- circles -----------------------------------------------------------------------------------------------------
def import_graph(root: Path = ROOT) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """({module: {module of ours it imports: first line}}, {module: its file}); a module importing itself is no
    edge."""
    files = our_modules(root)
    graph = {}
    for mod, path in files.items():
        edges = graph.setdefault(mod, {})
        for line, t in resolved_imports(path, root, files):
            if t in files and t != mod:
                edges[t] = min(line, edges.get(t, line))
    return graph, files


def circles(root: Path = ROOT) -> list[str]:
    """One line per strongly connected group of modules: a shortest loop through it, each file with the line of the
    import that leads to the next ('engine/a.py:3 -> engine/b.py:7 -> engine/a.py')."""
    graph, files = import_graph(root)
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):                                                # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:
        start, inside = group[0], set(group)
        prev, frontier = {start: None}, [start]                  # breadth first: the shortest way back to start
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in inside and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        loop = [last]
        while prev[loop[-1]] is not None:
            loop.append(prev[loop[-1]])
        loop.reverse()                                           # start ... last, and last imports start
        hops = [f"{files[a].relative_to(root)}:{graph[a][b]}" for a, b in zip(loop, loop[1:] + [start])]
        more = sorted(str(files[m].relative_to(root)) for m in inside - set(loop))
        found.append(" -> ".join(hops + [str(files[start].relative_to(root))])
                     + (f" (and {len(more)} more files round the same circle: {', '.join(more)})" if more else ""))
    return found


def test_no_import_circles():
    bad = circles()
    assert not bad, "import circles (file:line of each import round the loop):\n" + "\n".join(bad)


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


@pytest.mark.parametrize("files, loop", [
    ({"engine/a.py": "from engine import b\n", "engine/b.py": "def f():\n    import engine.a\n"},
     ["engine/a.py:1", "engine/b.py:2", "engine/a.py"]),
    ({"engine/cpu/x.py": "from engine.model import M\n", "engine/model.py": "import torch\nfrom engine.cpu.y import Y\n",
      "engine/cpu/y.py": "from . import x\n"},
     ["engine/cpu/x.py:1", "engine/model.py:2", "engine/cpu/y.py:1", "engine/cpu/x.py"]),
    ({"recipes/p.py": "import importlib\nq = importlib.import_module('recipes.q')\n", "recipes/q.py": "from recipes.p import q\n"},
     ["recipes/p.py:2", "recipes/q.py:1", "recipes/p.py"]),
])
def test_a_planted_circle_is_found(tmp_path, files, loop):
    """A loop of two or three files, through a lazy import, a relative one or import_module, is reported with each
    file and the line of its import; the rest of the tree is not."""
    for p in OURS:
        (tmp_path / p).mkdir()
    (tmp_path / "engine" / "cpu").mkdir()
    (tmp_path / "engine" / "ok.py").write_text("from engine import a\n" if "engine/a.py" in files else "import os\n")
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    assert circles(tmp_path) == [" -> ".join(loop)]


@pytest.mark.parametrize("name, source, report", [
    ("engine/model.py", "def f():\n    from engine.cpu.kernels import rmsnorm\n",
     "engine/model.py:2: core imports engine.cpu.kernels (cpu)"),
    ("engine/cpu/packed.py", "from engine.loading.weights import x\n",
     "engine/cpu/packed.py:1: cpu imports engine.loading.weights (loading)"),
    ("engine/training/data.py", "from engine.agents.prompts import ROLES\n",
     "engine/training/data.py:1: training imports engine.agents.prompts (agents)"),
    ("engine/training/trainer.py", "from engine.serving import generate\n",
     "engine/training/trainer.py:1: training imports engine.serving (serving)"),
    ("engine/serving/http_server.py", "def main():\n    from engine import cli\n",
     "engine/serving/http_server.py:2: serving imports engine.cli (cli)"),
])
def test_a_planted_upward_wing_import_is_found(tmp_path, name, source, report):
    """An import up a row of WINGS (or across, training <-> serving) is reported with file, line and both wings."""
    for d in ("engine/cpu", "engine/loading", "engine/training", "engine/serving", "engine/agents"):
        (tmp_path / d).mkdir(parents=True)
    for name_ in ("engine/cli.py", "engine/model.py", "engine/loading/hub.py"):
        (tmp_path / name_).write_text("import os\n")
    (tmp_path / name).write_text(source)
    (tmp_path / "engine" / "serving" / "ok.py").write_text("from engine.loading import hub\nfrom engine.cpu import x\n"
                                                           "from engine.model import Transformer\n")
    (tmp_path / "engine" / "cli.py").write_text("from engine.serving import ok\nfrom engine.agents import mapcoder\n")
    assert wing_violations(tmp_path) == [report]
