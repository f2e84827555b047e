"""The import graph of megamlm, read from the source (ast): no cycles, and the stack goes one way.

Every import counts, at the top of a module or inside a function: a lazy import that only dodges a
cycle is still one. Importing ``a.b.c`` also runs ``a.b``'s ``__init__``: that edge counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "megamlm").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    parts = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        out.add(f"{base}.{a.name}")
                    elif base in mods:
                        out.add(base)
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 2)}  # itself and its packages
        for target in list(out):  # the packages a target's import runs, other than the importer's own
            parts = target.split(".")
            out |= {".".join(parts[:k]) for k in range(2, len(parts))} - own
        graph[name] = out - {name} - {"megamlm"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_a_cycle(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _a_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle inside a strongly connected component: a → … → a (breadth-first back to the start)."""
    start = min(comp)
    prev = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_megamlm_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


#: The stack, bottom (0) to top: a module may import its own layer's and lower layers' modules only
#: (README "Layout"). Same-layer imports between packages are allowed where they form no cycle.
LAYERS = {"config": 0, "tokenizer": 0, "distributed": 0, "telemetry": 0, "flops": 0, "errors": 0, "labels": 0,
          "optim": 0,
          "ops": 1, "model": 2, "parallel": 3,
          "objectives": 4, "engine": 4, "data": 4, "convert": 4, "checkpoint": 4,
          "trainer": 5, "steps": 5,
          "pretrain": 6, "finetune": 6, "bench": 6, "bench_data": 6, "bench_electra": 6, "bench_engine": 6,
          "bench_loop": 6, "prepare": 6, "preflight": 6,
          "cli": 7, "__main__": 7}


def _layer(module: str) -> int:
    top = module.split(".")[1]
    assert top in LAYERS, f"{module}: add megamlm.{top} to LAYERS (and the README's Layout)"
    return LAYERS[top]


def test_the_stack_goes_one_way():
    """cli → pretrain / finetune / bench → trainer → objectives, engine, data, convert → parallel → model →
    ops → config, tokenizer, distributed, telemetry: no import reaches up."""
    up = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
          for a, bs in sorted(import_graph().items()) if a != "megamlm" for b in sorted(bs) if _layer(b) > _layer(a)]
    assert not up, "imports up the stack: " + "; ".join(up)


def test_no_module_over_500_lines_and_the_encoder_reads_in_one_sitting():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert not {n: k for n, k in sizes.items() if k > 500}
    assert sizes["megamlm.model.encoder"] <= 300
