"""The kit's import graph: no cycles, and rooms import only downward (DESIGN.md's layers).

Layers, top to bottom (a module may import its own layer or lower ones):
  3 entry points: train.py, evaluate.py (and its eval_protocol.py), plan.py
  2 method rooms: methods/, backdoor/, interpret/
  1 base rooms: rollout/, rewards/, metrics/, data/, models/, results/ (the study store and its
    statistics), recipes/ (the typed method configs, which import nothing of the kit)
  0 shared bottom modules: hardware.py, checkpointing.py, console.py, run_logger.py and the
    package's __init__: they import no other part of the kit (data/ and methods/ use
    checkpointing, methods/ and backdoor/ use hardware, the entry points use all four).
Rooms of one layer may import each other, but the room graph must stay acyclic too: at f8f4801
`methods/predictor.py -> interpret/` closed the circle methods -> interpret -> backdoor -> methods
(the issue's one upward arrow), which the room check reports.
Imports are read with `ast` (function-local ones included), so the test imports nothing; the
cycle check is the standard library's topological sort.
"""

import ast
from collections import defaultdict
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "osftkit"
LAYERS = {
    **dict.fromkeys(("train", "evaluate", "eval_protocol", "plan"), 3),
    **dict.fromkeys(("methods", "backdoor", "interpret"), 2),
    **dict.fromkeys(("rollout", "rewards", "metrics", "data", "models", "results", "recipes"), 1),
    **dict.fromkeys(("hardware", "checkpointing", "console", "run_logger", ""), 0),
}


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


Graph = dict[str, set[str]]


def import_graph(package: Path = PACKAGE) -> Graph:
    """Module -> kit modules it imports (`from a.b import c` counts a.b.c when c is a module)."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: Graph = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def edges(graph: Graph) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets)


def room_graph(graph: Graph) -> Graph:
    rooms: Graph = defaultdict(set)
    for a, b in edges(graph):
        if room(a) != room(b):
            rooms[room(a)].add(room(b))
    return rooms


def cycle(graph: Graph) -> list[str]:
    """One import cycle of `graph`, or [] when it has none."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        return error.args[1]
    return []


def room(module: str) -> str:
    """`osftkit.interpret.feature_test` -> `interpret`; the package itself -> ''."""
    return module.split(".")[1] if "." in module else ""


def upward_imports(graph: Graph) -> list[tuple[str, str]]:
    return [(a, b) for a, b in edges(graph) if LAYERS[room(a)] < LAYERS[room(b)]]


def test_every_room_has_a_layer():
    assert {room(m) for m in import_graph()} <= set(LAYERS)


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert cycle(graph) == []
    assert cycle(room_graph(graph)) == []


def test_rooms_import_only_downward():
    assert upward_imports(import_graph()) == []


def test_the_check_sees_an_upward_import_and_a_cycle(tmp_path):
    package = tmp_path / "osftkit"
    for sub in ("models", "interpret"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "models" / "a.py").write_text("from osftkit.interpret import b\n")
    (package / "interpret" / "b.py").write_text("import osftkit.models.a\n")
    graph = import_graph(package)
    assert upward_imports(graph) == [
        ("osftkit.models.a", "osftkit.interpret"),
        ("osftkit.models.a", "osftkit.interpret.b"),
    ]
    assert set(cycle(graph)) == {"osftkit.models.a", "osftkit.interpret.b"}
    assert set(cycle(room_graph(graph))) == {"models", "interpret"}
