"""The package's import graph: no cycles, and the layers point down.

Every ``import`` / ``from ... import`` anywhere in a module (function bodies included: a
lazy import is still a dependency) is an edge. ``python python_tests/test_layers.py``
prints each module's floor (0 = imports nothing of calm_fast)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a reference layer may import only what sits beside or below it
LOWER = {
    "model": {"model", "errors"},
    "codec": {"model", "codec", "errors"},
    "kernels": {"model", "kernels", "errors"},
}


def modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "calm_fast").rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    for p in (ROOT / "kernels").glob("*.py"):
        name = "calm_fast.kernels" + ("" if p.stem == "__init__" else "." + p.stem)
        out[name] = p
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    g = {}
    for name, path in mods.items():
        pkg = name if path.stem == "__init__" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # a submodule named in the list is the edge; else the module itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                while t and t not in mods:  # a symbol: its module
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("calm_fast"):
                    deps.add(t)
        g[name] = deps
    # importing a.b.c runs a/__init__ and a/b/__init__: those are not edges we draw
    return {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in g.items()}


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(g) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def floors(g) -> dict[str, int]:
    memo = {}

    def f(m):
        if m not in memo:
            memo[m] = 0
            memo[m] = 1 + max((f(d) for d in g[m]), default=-1)
        return memo[m]

    return {m: f(m) for m in g}


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_reference_layers_import_nothing_above_them():
    bad = [(m, d) for m, ds in graph().items() if layer(m) in LOWER
           for d in ds if layer(d) not in LOWER[layer(m)]]
    assert bad == [], "reference modules import fast/runtime/train code: " + repr(bad)


def test_the_walker_sees_relative_lazy_and_aliased_imports(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a planted cycle are found."""
    src = tmp_path / "calm_fast"
    (src / "model").mkdir(parents=True)
    (src / "fast").mkdir()
    (tmp_path / "kernels").mkdir()
    (src / "__init__.py").write_text("")
    (src / "model" / "__init__.py").write_text("")
    (src / "fast" / "__init__.py").write_text("")
    (src / "model" / "a.py").write_text("def f():\n    from ..fast import b as fb\n")
    (src / "fast" / "b.py").write_text("import calm_fast.fast.c\n")
    (src / "fast" / "c.py").write_text("from calm_fast.fast.b import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    g = graph()
    assert g["calm_fast.model.a"] == {"calm_fast.fast.b"}
    assert cycles(g) == [["calm_fast.fast.b", "calm_fast.fast.c"]]


if __name__ == "__main__":
    g = graph()
    fl = floors(g)
    for m in sorted(g, key=lambda m: (fl[m], m)):
        print(f"{fl[m]:3d}  {m}")
    print("floors:", max(fl.values()) + 1, " cycles:", cycles(g))
