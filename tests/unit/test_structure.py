"""The package's structure, read from the source: the import graph (with `ast`) has no cycle
between modules and points down the layers of docs/architecture.md (nothing imports upward),
and only parallel/ talks to other ranks through torch.distributed directly.

Every import counts, a deferred one inside a function as much as one at the top of a module: a
deferred import is still a dependency, and the cycles this test removed were all deferred.
"""
import ast
import os
import re
from pathlib import Path

import megaswift

PACKAGE = Path(megaswift.__file__).parent

# Lowest first; a module may import from its own layer or any layer below it. Keyed by the
# first component under megaswift (a subpackage or a top-level module).
LAYERS = [
    {"errors", "faults", "dtypes", "section", "rewards"},  # no megaswift imports at all
    {"device"},
    {"kernels", "parallel"},
    {"models"},
    {"checkpoint", "data"},
    {"convert"},
    {"setup", "rollout"},
    {"train"},
    {"config", "commands", "recipes", "planner"},  # config reads the algorithms' sections from train/registry.py
    {"quickstart", "testing", "launch"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("megaswift",) + parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:  # a module, or the module holding the imported name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{base}" if base else up
                names = [f"{base}.{a.name}" for a in node.names] or [base]
                names = [n if n in mods else base for n in names]
            else:
                continue
            deps |= {r for n in names if n.startswith("megaswift") and (r := resolve(n))}
        # an empty package __init__ is only a namespace, not something a submodule depends on
        graph[mod] = {d for d in deps - {mod} if mods[d].name != "__init__.py" or mods[d].read_text().strip()}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "megaswift"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_layers():
    graph = import_graph()
    unknown = sorted({layer_of(m) for m in graph} - set(RANK) - {"megaswift"})
    assert not unknown, f"add these to LAYERS (and docs/architecture.md): {unknown}"
    upward = [f"{a} -> {d}" for a, deps in sorted(graph.items()) for d in sorted(deps)
              if layer_of(a) != "megaswift" and RANK[layer_of(a)] < RANK[layer_of(d)]]
    assert not upward, "imports that point upward:\n" + "\n".join(upward)


def test_the_graph_sees_deferred_and_relative_imports(tmp_path):
    """The checker itself: a cycle made only of a deferred relative import is found."""
    graph = import_graph()
    assert "megaswift.setup" in graph["megaswift.train.build"]       # `from megaswift import setup`
    assert "megaswift.train.plan" in graph["megaswift.train.build"]  # `from .plan import ...`
    assert "megaswift.train.build" in graph["megaswift.commands"]    # deferred, inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert os.path.isdir(PACKAGE / "parallel")


# a collective or the job's store: outside parallel/ these go through parallel/'s helpers
# (parallel/collectives.py for plain ones); creating and destroying the process group is not one
RAW_COLLECTIVE = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|barrier|send|recv|isend|irecv|"
                            r"reduce_scatter\w*|all_to_all\w*|gather|scatter|distributed_c10d)\b")


def test_collectives_only_through_parallel():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "parallel":
            continue
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if RAW_COLLECTIVE.search(line.split("#")[0]):
                hits.append(f"megaswift/{rel}:{i}: {line.strip()}")
    assert not hits, "raw torch.distributed collectives outside parallel/:\n" + "\n".join(hits)
