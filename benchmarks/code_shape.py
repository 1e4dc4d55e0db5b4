"""The shape of the package's code: function lengths per module, local imports, the import graph.

Usage::

    python benchmarks/code_shape.py [--json FILE]

"Code lines" of a function are its lines that hold code: not blank, not comments, not its
docstring (nested functions count in their own right and in the enclosing one). The import graph
has an edge ``a → b`` for every ``lplr_dask`` module b that module a imports, at module top or
inside a function (``TYPE_CHECKING`` imports are left out: they never run).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import statistics
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lplr_dask"


def _code_lines(source: str) -> set[int]:
    """Line numbers that hold a token other than a comment, a newline or an indent."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _docstring_lines(node: ast.AST) -> set[int]:
    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return set()
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        return set(range(body[0].lineno, body[0].end_lineno + 1))  # type: ignore[operator]
    return set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def analyse(package: Path = PACKAGE) -> dict:
    functions = []
    graph: dict[str, set[str]] = {}
    local_imports = 0
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        code = _code_lines(source)
        module = _module_name(path)
        docs: set[int] = set()
        for node in ast.walk(tree):
            docs |= _docstring_lines(node)
        edges = graph.setdefault(module, set())

        def visit(
            node: ast.AST,
            in_function: bool,
            module: str = module,
            code: set[int] = code,
            docs: set[int] = docs,
            path: Path = path,
            edges: set[str] = edges,
        ) -> None:
            nonlocal local_imports
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    span = set(range(child.lineno, child.end_lineno + 1))  # type: ignore[operator]
                    functions.append(
                        {
                            "module": module,
                            "name": child.name,
                            "line": child.lineno,
                            "code_lines": len((span & code) - docs),
                            "params": len(child.args.args) + len(child.args.kwonlyargs),
                        }
                    )
                    visit(child, True)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    names = []
                    if isinstance(child, ast.ImportFrom) and child.module:
                        base = child.module
                        if child.level:
                            pkg = (
                                module.split(".")[: -child.level]
                                if not path.name == "__init__.py"
                                else module.split(".")
                            )
                            base = ".".join(pkg + ([child.module] if child.module else []))
                        names = [f"{base}.{a.name}" for a in child.names]  # a submodule, or a name of base
                    elif isinstance(child, ast.Import):
                        names = [a.name for a in child.names]
                    hit = False
                    for name in names:
                        if name.startswith("lplr_dask"):
                            target = _resolve(name, package)
                            if target and target != module:
                                edges.add(target)
                                hit = True
                    if in_function and hit:
                        local_imports += 1
                visit(child, in_function)

        visit(tree, False)
    return {"functions": functions, "graph": {k: sorted(v) for k, v in graph.items()}, "local_imports": local_imports}


def _resolve(name: str, package: Path) -> str | None:
    """The longest prefix of a dotted name that is a module or package of lplr_dask."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        rel = Path(package.parent, *parts[:i])
        if rel.with_suffix(".py").exists() or (rel / "__init__.py").exists():
            return ".".join(parts[:i])
    return None


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
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

    for v in graph:
        if v not in index:
            strong(v)
    return out


def report(data: dict) -> str:
    fns = data["functions"]
    by_module: dict[str, list[int]] = {}
    for f in fns:
        by_module.setdefault(f["module"], []).append(f["code_lines"])

    def row(name: str, values: list[int]) -> str:
        values = sorted(values)
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        return f"| {name} | {len(values)} | {statistics.median(values):g} | {p90} | {values[-1]} |"

    lines = ["| module | functions | median | p90 | max |", "|---|---|---|---|---|"]
    lines += [row(m, v) for m, v in sorted(by_module.items())]
    lines.append(row("**all**", [f["code_lines"] for f in fns]))
    lines += ["", "| 10 longest | code lines | parameters |", "|---|---|---|"]
    for f in sorted(fns, key=lambda f: -f["code_lines"])[:10]:
        lines.append(f"| `{f['module']}.{f['name']}` | {f['code_lines']} | {f['params']} |")
    lines += ["", f"function-local imports of lplr_dask modules: {data['local_imports']}"]
    cyc = cycles(data["graph"])
    lines.append("import cycles: " + ("; ".join(" ↔ ".join(c) for c in cyc) if cyc else "none"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the raw data to this file")
    parser.add_argument("--graph", action="store_true", help="print the import graph")
    args = parser.parse_args()
    data = analyse()
    print(report(data))
    if args.graph:
        print()
        for module, deps in sorted(data["graph"].items()):
            print(f"{module} -> {', '.join(d.removeprefix('lplr_dask.') for d in deps) or '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
