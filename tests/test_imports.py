"""The import graph: data flows one way (corpus -> index -> retriever -> model -> decoding -> serving) and no
module imports a later stage or a sibling of its own stage; no cycle. Read from the source (every import,
lazy ones inside functions too), so a new back edge fails here whatever the code path that would run it."""

import ast
from pathlib import Path

import ragline

ROOT = Path(ragline.__file__).parent

# The parts in pipeline order: a module may import its own part and parts of a lower rank only. Parts of one
# rank are siblings and may not import each other.
PARTS = {
    "foundation": (0, ("ragline.errors", "ragline.vocab", "ragline.paths", "ragline.atomic", "ragline.version",
                       "ragline.runconfig", "ragline.profile", "ragline.yielding")),
    "corpus": (1, ("ragline.corpus",)), "questions": (1, ("ragline.questions",)),
    "models": (2, ("ragline.models",)),
    "index": (3, ("ragline.index",)),
    "retriever": (4, ("ragline.retriever",)), "scale": (4, ("ragline.scale",)),
    "rag": (5, ("ragline.rag",)),
    "system": (6, ("ragline.system",)),  # the front door, ragline.open(): what eval, serve and the CLI open
    "evaluate": (7, ("ragline.evaluate",)), "train": (7, ("ragline.train",)),
    "serve": (8, ("ragline.serve",)),
    "cli": (9, ("ragline.cli", "ragline.__main__")),
    "package": (10, ("ragline",)),  # the package itself: exports ragline.open; nothing imports it back
}
RANKS = {name: rank for name, (rank, _) in PARTS.items()}
PREFIXES = {prefix: name for name, (_, prefixes) in PARTS.items() for prefix in prefixes}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The ragline modules ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ragline"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ragline":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if _is_module(sub) else node.module)
    return out


def _part(module: str) -> str:
    names = module.split(".")
    for n in range(len(names), 0, -1):
        prefix = ".".join(names[:n])
        if prefix in PREFIXES and (n > 1 or module == "ragline"):
            return PREFIXES[prefix]
    raise AssertionError(f"{module} belongs to no part of PARTS: give it one")


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in sorted(ROOT.rglob("*.py"))}


def test_no_import_runs_back_up_the_pipeline():
    bad = []
    for module, imports in _graph().items():
        src = _part(module)
        for dst in imports:
            target = _part(dst)
            if target != src and RANKS[target] >= RANKS[src]:
                bad.append(f"{module} imports {dst} ({target} is not before {src})")
    assert not bad, "\n".join(sorted(bad))


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_back_edge(tmp_path):
    """The rule itself: an index module importing the retriever is a back edge (so the test above can fail)."""
    src, dst = _part("ragline.index.dense"), _part("ragline.retriever")
    assert (src, dst) == ("index", "retriever") and RANKS[dst] > RANKS[src]
    assert _part("ragline.evaluate.answers") != _part("ragline.train.rag")  # siblings: neither may import the other
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ragline.retriever import Retriever\n    from ragline import vocab\n")
    assert _imports(f) == {"ragline.retriever", "ragline.vocab"}
