"""The package's layers, read from the import statements of every module.

``LAYERS`` is the one table of which package may import which (lowest first); the table in
docs/architecture.md must say the same. Every ``import`` under ``src/ctfm`` is parsed with ``ast``,
function-local and relative imports included, and the test fails, with a readable list, on:

- an import of a package in the same or a higher layer (sideways or upward);
- a cycle between packages, or between modules at import time;
- an import of another module's private name (``from ctfm.x import _y``, ``module._y``);
- a ctfm import inside a function outside ``ctfm.cli`` and the lazy top-level ``ctfm/__init__.py``,
  unless ``DEFERRED`` names it with its reason.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ctfm"
DOC = ROOT / "docs" / "architecture.md"

# Lowest first. A package imports only from layers strictly below it, or from itself; never the CLI.
# The leaves are ordered too (errors < runtime < runs). Moved from the first plan, for the code's sake:
# synth up to layer 3 (it reads label tables with ctfm.io), cohorts up to layer 4 (its inventory checks
# every scan with ctfm.preprocess).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("runtime",),
    ("runs",),
    ("io", "store", "evaluate.metrics", "evaluate.reports"),
    ("synth", "preprocess"),
    ("cohorts", "models"),
    ("embedding",),
    ("pretrain", "search", "finetune"),
    ("predict", "evaluate.probes", "evaluate.zeroshot"),
    ("node", "app"),
    ("cli",),
)
LAYER_NAMES = ("1a", "1b", "1c", "2", "3", "4", "5", "6", "7", "8", "9")

# Imports that break the table for now, each with its reason: (importing module, imported module) -> reason.
# An entry that no longer occurs fails test_allow_lists_are_current.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {}

# ctfm imports that stay inside a function, each with its reason: (importing module, imported module) -> reason.
DEFERRED: dict[tuple[str, str], str] = {
    ("ctfm.finetune.cls", "ctfm.finetune.cls_module"): "the LightningModule: Lightning (the training extra) is "
    "imported only when a run trains, since ctfm.predict.cls reads this module's preprocessing",
}

# Outside the table: the lazy top level (PEP 562) and ``python -m ctfm``; ``ctfm.evaluate`` is a
# namespace of sub-packages whose ``__init__`` imports nothing.
TOP_LEVEL = {"ctfm", "ctfm.__main__"}
# Names of the top-level package that any module may import (set before anything else is imported).
TOP_LEVEL_PUBLIC = {"__version__"}


def package_of(module: str) -> str | None:
    """The table's package of a dotted module name (``ctfm.evaluate.metrics.stats`` -> ``evaluate.metrics``)."""
    parts = module.split(".")
    if module in TOP_LEVEL or parts[0] != "ctfm" or len(parts) < 2:
        return None
    if parts[1] == "evaluate":
        return "evaluate" if len(parts) == 2 else f"evaluate.{parts[2]}"
    return parts[1]


def layer_of() -> dict[str, int]:
    return {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (the deepest that exists)
    names: tuple[str, ...]  # names taken from it (empty for ``import x``)
    in_function: bool
    line: int

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str, is_package: bool, modules: set[str]):
        self.source, self.is_package, self.modules = source, is_package, modules
        self.depth = 0
        self.imports: list[Import] = []
        self.aliases: dict[str, str] = {}  # local name -> ctfm module it names
        self.private_attrs: list[tuple[str, str, int]] = []  # (module, name, line)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] != "ctfm":
                continue
            self.imports.append(Import(self.source, alias.name, (), self.depth > 0, node.lineno))
            if alias.asname:
                self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom):
        base = _resolve(self.source, self.is_package, node)
        if base.split(".")[0] != "ctfm":
            return
        plain: list[str] = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.modules:  # ``from ctfm.io import labels``: the module itself
                self.imports.append(Import(self.source, sub, (), self.depth > 0, node.lineno))
                self.aliases[alias.asname or alias.name] = sub
            else:
                plain.append(alias.name)
        if plain:
            self.imports.append(Import(self.source, base, tuple(plain), self.depth > 0, node.lineno))

    def visit_Attribute(self, node: ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                self.private_attrs.append((self.aliases[node.value.id], node.attr, node.lineno))
        self.generic_visit(node)


@dataclass
class Graph:
    imports: list[Import]
    private_attrs: list[tuple[str, str, str, int]]  # (source, module, name, line)


def collect() -> Graph:
    modules = all_modules()
    names = set(modules)
    imports: list[Import] = []
    private_attrs: list[tuple[str, str, str, int]] = []
    for name, path in modules.items():
        collector = _Collector(name, path.name == "__init__.py", names)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports += collector.imports
        private_attrs += [(name, mod, attr, line) for mod, attr, line in collector.private_attrs]
    return Graph(imports, private_attrs)


def _in_cli(module: str) -> bool:
    return module == "ctfm.cli" or module.startswith("ctfm.cli.")


def layer_violations(graph: Graph) -> list[str]:
    layers = layer_of()
    out = []
    for imp in graph.imports:
        if imp.source in TOP_LEVEL:
            continue
        src, dst = package_of(imp.source), package_of(imp.target)
        if imp.target == "ctfm":
            extra = set(imp.names) - TOP_LEVEL_PUBLIC
            if extra:
                out.append(f"{imp.where()} imports {sorted(extra)} from the lazy top level ctfm")
            continue
        if src is None or dst is None:
            out.append(f"{imp.where()} -> {imp.target}: module outside the layer table")
            continue
        if dst == "evaluate" or src == "evaluate":
            if src != dst:
                out.append(f"{imp.where()} -> {imp.target}: ctfm.evaluate itself holds no code to import")
            continue
        if src == dst or (imp.source, imp.target) in LAYER_EXCEPTIONS:
            continue
        if src not in layers or dst not in layers:
            out.append(f"{imp.where()} -> {imp.target}: package {src if src not in layers else dst} not in LAYERS")
        elif layers[dst] >= layers[src]:
            way = "sideways" if layers[dst] == layers[src] else "upward"
            out.append(
                f"{imp.where()} -> {imp.target}: {way} ({src}, layer {LAYER_NAMES[layers[src]]} -> "
                f"{dst}, layer {LAYER_NAMES[layers[dst]]})"
            )
    return out


def private_violations(graph: Graph) -> list[str]:
    out = []
    for imp in graph.imports:
        if imp.target == imp.source:
            continue
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__"):
                out.append(f"{imp.where()} imports private {imp.target}.{name}")
        last = imp.target.rsplit(".", 1)[-1]
        if last.startswith("_") and not last.startswith("__") and not imp.names:
            out.append(f"{imp.where()} imports private module {imp.target}")
    for source, module, name, line in graph.private_attrs:
        if module != source:
            out.append(f"{source}:{line} uses private {module}.{name}")
    return out


def deferred_imports(graph: Graph) -> list[Import]:
    return [imp for imp in graph.imports if imp.in_function]


def deferred_violations(graph: Graph) -> list[str]:
    out = []
    for imp in deferred_imports(graph):
        if imp.source in TOP_LEVEL or _in_cli(imp.source):
            continue
        if (imp.source, imp.target) in DEFERRED:
            continue
        out.append(f"{imp.where()} imports {imp.target} inside a function")
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def package_cycles(graph: Graph) -> list[list[str]]:
    edges: dict[str, set[str]] = {}
    for imp in graph.imports:
        src, dst = package_of(imp.source), package_of(imp.target)
        if src and dst and src != dst and not _in_cli(imp.source):
            edges.setdefault(src, set()).add(dst)
    return _cycles(edges)


def module_cycles(graph: Graph) -> list[list[str]]:
    """Cycles among the modules' own imports (all of them, deferred ones too), outside the CLI and top level."""
    edges: dict[str, set[str]] = {}
    for imp in graph.imports:
        if imp.source in TOP_LEVEL or _in_cli(imp.source) or imp.target in TOP_LEVEL:
            continue
        edges.setdefault(imp.source, set()).add(imp.target)
    return _cycles(edges)


def doc_layers() -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The layer table of docs/architecture.md (section "Layers"): rows ``| 1a | `ctfm.errors` | ... |``
    -> (layer names, packages per layer)."""
    text = DOC.read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\d+[a-z]?)\s*\|([^|]*)\|", section, flags=re.M)
    return tuple(name for name, _ in rows), tuple(tuple(re.findall(r"`ctfm\.([\w.]+)`", cells)) for _, cells in rows)


def _report(title: str, items: list[str]) -> str:
    return f"{title} ({len(items)}):\n  " + "\n  ".join(items)


def test_doc_table_is_the_tests_table():
    names, layers = doc_layers()
    assert (names, layers) == (LAYER_NAMES, LAYERS), "the layer table of docs/architecture.md differs from LAYERS here"


def test_every_package_is_in_the_table():
    layers = layer_of()
    packages = {package_of(m) for m in all_modules()} - {None, "evaluate"}
    missing = sorted(p for p in packages if p not in layers)
    assert not missing, f"packages missing from LAYERS: {missing}"


def test_imports_point_down_the_layers():
    bad = layer_violations(collect())
    assert not bad, _report("imports against the layer table", bad)


def test_no_package_cycles():
    cycles = package_cycles(collect())
    assert not cycles, _report("package cycles", [" <-> ".join(c) for c in cycles])


def test_no_module_cycles():
    cycles = module_cycles(collect())
    assert not cycles, _report("module cycles", [" <-> ".join(c) for c in cycles])


def test_no_private_names_across_modules():
    bad = private_violations(collect())
    assert not bad, _report("imports of another module's private name", bad)


def test_ctfm_imports_stand_at_the_top():
    bad = deferred_violations(collect())
    assert not bad, _report("ctfm imports inside functions (move them to the top, or name them in DEFERRED)", bad)


def test_allow_lists_are_current():
    graph = collect()
    deferred = {(imp.source, imp.target) for imp in deferred_imports(graph)}
    present = {(imp.source, imp.target) for imp in graph.imports}
    stale = sorted(f"DEFERRED: {s} -> {t}" for s, t in DEFERRED if (s, t) not in deferred)
    stale += sorted(f"LAYER_EXCEPTIONS: {s} -> {t}" for s, t in LAYER_EXCEPTIONS if (s, t) not in present)
    assert not stale, _report("allow-list entries that no longer occur", stale)


def test_the_parser_sees_what_it_must():
    """The checks above rest on the parser: function-local, relative and attribute uses are all seen."""
    source = "ctfm.embedding.runner"
    tree = ast.parse(
        "from . import modes as m\n"
        "from ..io.labels import _x\n"
        "def f():\n"
        "    from ctfm.store import embeddings\n"
        "    return m._private\n"
    )
    collector = _Collector(source, False, set(all_modules()))
    collector.visit(tree)
    got = {(i.target, i.names, i.in_function) for i in collector.imports}
    assert got == {
        ("ctfm.embedding.modes", (), False),
        ("ctfm.io.labels", ("_x",), False),
        ("ctfm.store.embeddings", (), True),
    }
    assert collector.private_attrs == [("ctfm.embedding.modes", "_private", 5)]
    assert package_of("ctfm.evaluate.metrics.stats") == "evaluate.metrics"
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
