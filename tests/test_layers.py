"""The package's shape: layers that only import downward, no import circle, one model reference end to end.

Layers (DESIGN.md): core/ -> building blocks (attacks, oracles, attribution) -> methods (training, then detect,
then defenses) -> pipelines (and the demo lab) -> front ends (cli, ui). An import may go to the same folder or
to a lower layer; two folders of the same layer never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from forensics.core.errors import ForensicsError

PACKAGE = Path(__file__).resolve().parents[1] / "forensics"
RANKS = {
    "core": 0,
    "attacks": 1,
    "oracles": 1,
    "attribution": 1,
    "training": 2,
    "detect": 3,
    "defenses": 4,
    "pipelines": 5,
    "demo": 5,
    "cli": 6,
    "ui": 6,
    "__main__": 7,
    "__init__": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every forensics module ``path`` imports, at module level or inside functions (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "forensics"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "forensics":
                found.add(module)
    return found


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported not in modules and "." in imported:  # `from forensics.x import name`
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_every_folder_has_a_layer():
    folders = {_folder(m) for m in _graph()}
    assert folders <= set(RANKS), f"folders without a layer: {folders - set(RANKS)}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, targets in _graph().items():
        here = _folder(module)
        for target in targets:
            there = _folder(target)
            if there == here:
                continue
            if target == "forensics":
                wrong.append(f"{module} imports the package root")
            elif RANKS[there] >= RANKS[here]:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_core_imports_no_method_folder_and_methods_no_pipeline():
    graph = _graph()
    core_out = {t for m, ts in graph.items() if _folder(m) == "core" for t in ts if _folder(t) != "core"}
    assert not core_out
    methods = {"attacks", "oracles", "attribution", "training", "detect", "defenses"}
    upward = {
        (m, t)
        for m, ts in graph.items()
        if _folder(m) in methods
        for t in ts
        if _folder(t) in {"pipelines", "cli", "ui", "demo"}
    }
    assert not upward


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import circles: {cycles}"


def test_the_library_never_imports_gradio():
    offenders = [
        str(p)
        for p in PACKAGE.rglob("*.py")
        if "ui" not in p.relative_to(PACKAGE).parts[:1] and "gradio" in {n.split(".")[0] for n in _all_imports(p)}
    ]
    assert not offenders


def _all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_one_registry_style_with_aliases_and_checked_settings():
    from forensics.attacks import ATTACKS
    from forensics.attribution import ATTRIBUTIONS
    from forensics.core.registry import Registry
    from forensics.defenses import DEFENSES
    from forensics.detect import DETECTORS
    from forensics.oracles import ORACLES

    for registry in (ATTACKS, ORACLES, ATTRIBUTIONS, DETECTORS, DEFENSES):
        assert isinstance(registry, Registry)
        assert all(name == name.lower() and "_" not in name for name in registry.names())
    assert ATTACKS.resolve("optimized_patch") == "optimized-patch" and ORACLES.resolve("Ground_Truth") == "ground-truth"
    assert DETECTORS.names() == ["embedding-density", "oracle-guided", "trigger-inversion"]
    with pytest.raises(ForensicsError, match="unknown setting.*nonsense"):
        DEFENSES.build("cleanclip", nonsense=1)
    with pytest.raises(ForensicsError, match="unknown repair method 'nope'"):
        DEFENSES.build("nope")
