"""The package's layer rule (docs/ARCHITECTURE.md, "Layers"): a module imports only modules of
its own layer or a lower one, with no cycle; and lplr_dask modules are imported at module top,
except where a module says why not (the CLI's start-up time)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lplr_dask"

#: Lowest first. A subpackage counts as one module: its files may import each other.
LAYERS: list[set[str]] = [
    {"errors", "logs", "interrupts", "validation", "config"},
    {"backend", "progress"},
    {"sketch", "lanes", "quantize", "cluster", "gpu_cluster"},
    {"blocks", "schema"},
    {"store", "sources", "chunking", "backbone"},
    {"factorize", "guard"},
    {"factors", "options"},
    {"job"},
    {"budget", "target"},
    {"api", "append", "group", "baselines", "datasets", "convert", "verify", "export", "nn"},
    {"cli", "__main__", "dask_cli", "__init__"},
]

#: Modules allowed to import lplr_dask modules inside functions, and why.
LOCAL_IMPORTS_ALLOWED = {
    "cli": "start-up time: `lplr --help` and usage errors must not import dask.distributed and zarr",
    "__main__": "it only calls the CLI",
}


def _top(module: str) -> str:
    """``lplr_dask.quantize.gptq`` → ``quantize``; the package itself → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, package: Path = PACKAGE) -> list[tuple[str, bool]]:
    """(imported lplr_dask module, inside a function?) for every import in ``path``, except
    ``if TYPE_CHECKING:`` blocks, which never run."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if (
                isinstance(child, ast.If)
                and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING"
            ):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the file's own package
                    pkg = _package_of(path, package).split(".")
                    base = ".".join(pkg[: len(pkg) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "lplr_dask":
                    for alias in child.names:
                        found.append((_module(f"{base}.{alias.name}", package), in_function))
            elif isinstance(child, ast.Import):
                found.extend(
                    (_module(a.name, package), in_function) for a in child.names if a.name.split(".")[0] == "lplr_dask"
                )
            visit(child, inner)

    visit(tree, False)
    return found


def _package_of(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    return ".".join(rel.parts[:-1])


def _module(name: str, package: Path = PACKAGE) -> str:
    """The longest prefix of ``name`` that is a module or package of lplr_dask."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        p = Path(package.parent, *parts[:i])
        if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
            return ".".join(parts[:i])
    return parts[0]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != ["lplr_dask"]:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    top = _top(module) if module != "lplr_dask.__init__" else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/ARCHITECTURE.md")


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, path in _modules().items():
        for target, _ in _imports(path):
            if target == "lplr_dask":
                target = "lplr_dask.__init__"
            if _layer(target) > _layer(module):
                bad.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        src = _top(module)
        graph.setdefault(src, set()).update(_top(t) for t, _ in _imports(path) if t != "lplr_dask" and _top(t) != src)
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def walk(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                pytest.fail(
                    "import cycle: " + " → ".join(path[path.index(nxt) :] + [node, nxt])
                    if nxt in path
                    else f"import cycle through {node} → {nxt}"
                )
            if nxt not in seen:
                walk(nxt, path + [node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            walk(node, [])


def test_lplr_dask_imports_are_at_module_top():
    bad = [
        f"{module} imports {target} inside a function"
        for module, path in _modules().items()
        if _top(module) not in LOCAL_IMPORTS_ALLOWED
        for target, local in _imports(path)
        if local
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk finds an upward import and a function-local one (so the tests above can fail)."""
    package = tmp_path / "lplr_dask"
    package.mkdir()
    for name in ("__init__", "api", "store"):
        (package / f"{name}.py").write_text("")
    f = package / "errors.py"
    f.write_text("from lplr_dask.api import compress\n\ndef f():\n    from lplr_dask import store\n")
    found = _imports(f, package)
    assert found == [("lplr_dask.api", False), ("lplr_dask.store", True)]
    assert _layer("lplr_dask.api") > _layer("lplr_dask.errors")


def test_names_imported_across_modules_are_in_their_all():
    """A module imports from another module only what that module exports (its ``__all__``);
    inside a subpackage its modules may share private names."""
    import importlib

    bad = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lplr_dask.")
            ):
                continue
            if _top(node.module) == _top(module):  # within a subpackage
                continue
            exporter = importlib.import_module(node.module)
            exported = set(getattr(exporter, "__all__", ()))
            for alias in node.names:
                is_module = (
                    importlib.util.find_spec(f"{node.module}.{alias.name}") if hasattr(exporter, "__path__") else None
                )
                if alias.name not in exported and is_module is None:
                    bad.append(f"{module} imports {alias.name} from {node.module}, which does not export it")
    assert not bad, "\n".join(bad)
