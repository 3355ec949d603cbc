"""The dependency rules of DESIGN.md, checked on the source's imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROLE_PACKAGES = {"lsp_server", "feedback", "trainer", "evaluation"}
# The simulated developer (evaluation) is a client of the server and the nightly job: it
# speaks LSP to one and runs the other as a command, and nothing imports it.
FORBIDDEN = {
    "lsp_server": {"trainer", "evaluation"},
    "trainer": {"lsp_server", "evaluation"},
    "feedback": {"lsp_server", "trainer", "evaluation"},
    "evaluation": {"trainer"},
    "ghostloop": ROLE_PACKAGES,
}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package imported, whether the import sits inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], inner))
            visit(child, inner)

    visit(tree, False)
    return found


def test_packages_import_only_what_the_design_allows():
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name, nested in imports(path):
                # the core's subcommands reach role packages lazily, each when it runs
                command = path.parent == ROOT / "ghostloop" / "commands"
                lazy_cli = package == "ghostloop" and command and nested
                if name in forbidden and not lazy_cli:
                    violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def module_imports() -> dict[str, set[str]]:
    """Each module of the packages and the modules of the packages it imports: at the top,
    inside functions and under TYPE_CHECKING alike (a cycle is one wherever it hides)."""
    modules = {}
    for package in ("ghostloop", *sorted(ROLE_PACKAGES)):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the module
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for target in targets:
                found = known(target)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def test_no_module_imports_itself_through_others():
    graph = module_imports()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_the_simulated_developer_knows_the_server_only_by_its_protocol():
    """evaluation talks to the server over LSP: of lsp_server it may use the protocol's
    names and the position rules every client shares, never the server's insides."""
    graph = module_imports()
    allowed = {"lsp_server.protocol", "lsp_server.positions", "lsp_server"}
    reached = {
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.startswith("evaluation")
        for target in targets
        if target.startswith("lsp_server") and target not in allowed
    }
    assert reached == set()
