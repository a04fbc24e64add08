"""The import graph of the repository's packages, read from the source (nothing is imported), and
the layering rules it must keep: data flows one way,

    raw video → data_pipelines (writes shards) → keyface_jax/data (reads them) → training → run
    checkpoints → sampling / generation → mp4,

so no module import cycle, no cycle between stages (a stage is `data_pipelines`, `configs` or one
top-level entry of `keyface_jax`: `keyface_jax.data`, `keyface_jax.training`, `keyface_jax.train`,
...), and nothing in `keyface_jax` imports `data_pipelines`. Every import counts, also those inside
functions (a lazy import is still a dependency).

    python -m keyface_jax.testing.import_graph      # prints the stage graph and any violation
"""

from __future__ import annotations

import ast
import os
import sys
from collections import defaultdict

PACKAGES = ("keyface_jax", "data_pipelines", "configs")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name → file, for every .py file of PACKAGES."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[dotted.removesuffix(".__init__")] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        source = base + ("." + node.module if node.module else "")
    else:
        source = node.module or ""
    # `from pkg import sub` imports the submodule pkg.sub when there is one
    return [f"{source}.{alias.name}" for alias in node.names] + [source]


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """Module → the modules of PACKAGES it imports (anywhere in its source)."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            for name in _imported(node, module, path.endswith("__init__.py")):
                target = resolve(name)
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def stage(module: str) -> str:
    """keyface_jax.X... → keyface_jax.X; any other package → the package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "keyface_jax" and len(parts) > 1 else parts[0]


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        out[stage(module)].update(stage(t) for t in targets if stage(t) != stage(module))
    return dict(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def violations(root: str = ROOT) -> list[str]:
    """Every broken layering rule, one line each (empty when the layering holds)."""
    graph = import_graph(root)
    out = [f"module import cycle: {' → '.join(c)}" for c in cycles(graph)]
    out += [f"stage import cycle: {' → '.join(c)}" for c in cycles(stage_graph(graph))]
    out += [f"{m} imports {t} (keyface_jax must not import data_pipelines: data flows one way)"
            for m, targets in sorted(graph.items()) if m.startswith("keyface_jax")
            for t in sorted(targets) if t.startswith("data_pipelines")]
    return out


def main() -> int:
    stages = stage_graph(import_graph())
    for name in sorted(stages):
        print(f"{name:32s} → {', '.join(sorted(stages[name])) or '-'}")
    problems = violations()
    print("\n".join(problems) if problems else "layering holds: no import cycle, one-way data flow")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
