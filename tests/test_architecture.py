"""The package's shape: one sub-package per stage, each importing only the stages below it, no
import cycles between modules, no module that has grown past what one reader holds in mind.
Imports inside functions count: they run too, only later."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import neurocbir

PACKAGE = Path(neurocbir.__file__).parent
#: the stages, lowest first; a module may import its own stage and those before it
STAGES = (
    "errors",
    "files",
    "data",
    "models",
    "retrieval",
    "classify",
    "evaluate",
    "reports",
    "training",
    "serving",
    "app",
    "cli",
)
#: what of the web layer the CLI may import: serving it, and administering its users and audit trail
CLI_WEB = {"neurocbir.app.server", "neurocbir.app.users", "neurocbir.app.audit"}
MAX_LINES = 460


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("neurocbir", *parts))
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The neurocbir modules ``name`` imports (a package's ``from pkg import module`` names the module)."""
    modules = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("neurocbir.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("neurocbir"):
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 else -1


def test_every_module_belongs_to_a_stage():
    strays = [m for m in _modules() if m != "neurocbir" and m.split(".")[1] not in STAGES]
    assert not strays, f"modules outside the stage sub-packages: {strays}"


def test_a_stage_imports_only_the_stages_below_it():
    wrong = [
        f"{m} ({STAGES[_stage(m)]}) imports {i} ({STAGES[_stage(i)]})"
        for m, path in _modules().items()
        if m != "neurocbir"
        for i in _imports(m, path)
        if _stage(i) > _stage(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: _imports(m, p) for m, p in _modules().items()}
    # a package's __init__ re-exporting its own modules is no cycle: a module importing a sibling
    # imports the sibling, never the package's namespace
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_is_too_long():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    """The layering check fails on a lower stage importing a higher one (here: data importing the query engine)."""
    fake = tmp_path / "neurocbir"
    (fake / "data").mkdir(parents=True)
    (fake / "serving").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "serving" / "__init__.py").write_text("")
    (fake / "serving" / "service.py").write_text("X = 1\n")
    (fake / "data" / "cases.py").write_text("def f():\n    from neurocbir.serving.service import X\n    return X\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _imports("neurocbir.data.cases", fake / "data" / "cases.py") == {"neurocbir.serving.service"}
    assert _stage("neurocbir.serving.service") > _stage("neurocbir.data.cases")


def test_the_cli_and_benchmarks_use_the_query_engine_not_the_web_layer():
    """The CLI reaches the web layer only to serve it and to administer it; the benchmarks only to
    measure HTTP (an app they start); the query engine (`neurocbir.serving`) imports no web layer."""
    modules = _modules()
    cli = {
        f"{m} imports {i}"
        for m, p in modules.items()
        if m.startswith("neurocbir.cli")
        for i in _imports(m, p)
        if i.startswith("neurocbir.app") and i not in CLI_WEB
    }
    assert not cli, "\n".join(sorted(cli))
    bench = PACKAGE.parents[1] / "benchmarks"
    web = {"neurocbir.app.api", "neurocbir.app.server", "neurocbir.app.access", "neurocbir.app.oidc"} | CLI_WEB
    wrong = []
    for path in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("neurocbir.app")
                and node.module not in web
            ):
                wrong.append(f"{path.name} imports {node.module}")
    assert not wrong, "\n".join(wrong)
