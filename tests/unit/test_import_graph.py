"""No import cycles within megatron_patch/ and studies/, function-level imports included.

A cycle hidden behind an import inside a function still ties two modules into one: neither can be
read, moved or tested without the other. Read from the source with ast (nothing is imported).
"""

import ast

from tests.train_helpers import ROOT

PACKAGES = ("megatron_patch", "studies")


def module_files():
    """{dotted module name: path} of every .py file in PACKAGES."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(name, path):
    """Every module name an import statement anywhere in the file refers to, relative ones resolved;
    `from a import b` yields a.b, which import_graph reads as a where b is not a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph():
    files = module_files()
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(name, path):
            while imported and imported not in files:  # a name inside a module: the module
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph):
    """One cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state = {}  # absent: unvisited, 1: on the current path, 2: done
    for start in graph:
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert "megatron_patch.training.dry_run" in graph and "studies.lr_study" in graph
    # Function-level imports count: dry_run reads the trainer's parser inside build_parser().
    assert "megatron_patch.training.arguments" in graph["megatron_patch.training.dry_run"]
    assert "studies.spike_sweep" in graph["studies.lr_study"]


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
