"""The house rules that keep a new framework one folder: no module of the core names a framework
(only ``dualtune/backends/<name>/`` do, and their descriptors tell the core what it must know), and
the package imports from the checkout it sits in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dualtune

PACKAGE = Path(dualtune.__file__).parent
FRAMEWORK_WORDS = re.compile(r"\b(torch|pytorch|mindspore|mindnlp|mindtorch|msrun|torchrun)\b", re.I)


def core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if PACKAGE / "backends" not in p.parents)


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (documentation may name what it compares to)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def framework_names_in(path: Path) -> list[str]:
    """Every identifier, import and (non-doc) string in ``path`` that names a framework."""
    tree = ast.parse(path.read_text(), str(path))
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        words: list[str] = []
        if isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, ast.alias):
            words = [node.name]
        elif isinstance(node, ast.ImportFrom):
            words = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            words = [node.value]
        elif isinstance(node, ast.arg):
            words = [node.arg]
        for word in words:
            if FRAMEWORK_WORDS.search(word):
                found.append(f"{path.name}:{getattr(node, 'lineno', '?')}: {word[:80]!r}")
    return found


def test_no_module_of_the_core_names_a_framework():
    found = [hit for path in core_modules() for hit in framework_names_in(path)]
    assert found == []


def test_the_check_sees_a_framework_name(tmp_path):
    """The scan itself: an import, an attribute and a string are each caught; a docstring is not."""
    module = tmp_path / "m.py"
    module.write_text('"""Compared with torch."""\nimport mindspore\nx = a.torch\ny = "msrun"\n')
    found = [hit.split(": ", 1)[1] for hit in framework_names_in(module)]
    assert found == ["'mindspore'", "'torch'", "'msrun'"]


def test_every_framework_describes_itself_without_loading_it():
    import subprocess
    import sys

    code = (
        "import sys; from dualtune.backend import frameworks; fs = frameworks(); "
        "print([f.name for f in fs]); print(sorted(m for m in ('torch', 'mindspore', 'mindnlp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['torch', 'mindspore']", "[]"]


def test_the_package_imports_its_own_backends():
    """An editable install of a copy or worktree imports that copy's backends, not another's."""
    import dualtune.backends

    assert Path(dualtune.backends.__file__).parent.parent == PACKAGE
