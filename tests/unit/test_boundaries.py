"""The dependency rules of DESIGN.md, checked on the source's imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROLE_PACKAGES = {"lsp_server", "feedback", "trainer"}
FORBIDDEN = {
    "lsp_server": {"trainer"},
    "trainer": {"lsp_server"},
    "feedback": {"lsp_server", "trainer"},
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
                # the core's CLI reaches role packages lazily, one subcommand at a time
                lazy_cli = package == "ghostloop" and path.name == "cli.py" and nested
                if name in forbidden and not lazy_cli:
                    violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []
