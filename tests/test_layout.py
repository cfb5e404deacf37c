"""The layout's import rules (docs/design.md §1), read from every module's imports, including
those inside functions: the core imports no other part, workers and gateway never import each
other nor the processes or the test kit, the processes never import the test kit, and no module
takes another's ``_private`` name."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The parts, most specific first: a module belongs to the first whose prefix it starts with.
PARTS = (
    ("harness", "listenerpool.testing.harness"),
    ("test kit", "listenerpool.testing"),
    ("processes", "listenerpool.cli"),
    ("core", "listenerpool"),
    ("workers", "workers"),
    ("gateway", "gateway"),
)
# What each part may import besides itself (third-party packages are not checked here).
ALLOWED = {
    "core": {"core"},
    "workers": {"core"},
    "gateway": {"core"},
    "processes": {"core", "workers", "gateway"},
    "test kit": {"core", "workers", "gateway", "processes"},
    "harness": {"core", "workers", "gateway", "processes", "test kit"},
}
# `python -m gateway` / `python -m workers` are the command under another name: entry-point
# shims of the processes part that nothing imports.
SHIMS = {"gateway.__main__", "workers.__main__"}


def part_of(module: str) -> str | None:
    for part, prefix in PARTS:
        if module == prefix or module.startswith(prefix + "."):
            return part
    return None


def modules() -> Iterator[tuple[str, Path]]:
    for folder in ("listenerpool", "workers", "gateway"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def imports(path: Path, module: str) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base, [alias.name for alias in node.names], node.lineno


def test_the_layout_finds_every_part() -> None:
    found = {part_of(module) for module, _ in modules()}
    assert found == set(ALLOWED)


def test_each_part_imports_only_the_parts_below_it() -> None:
    broken = []
    for module, path in modules():
        if module in SHIMS:
            continue
        part = part_of(module)
        assert part is not None
        for imported, _, line in imports(path, module):
            target = part_of(imported)
            if target is not None and target != part and target not in ALLOWED[part]:
                broken.append(f"{path.relative_to(ROOT)}:{line}: {part} imports {imported}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("shim", sorted(SHIMS))
def test_the_python_m_shims_only_call_the_command(shim: str) -> None:
    path = ROOT / (shim.replace(".", "/") + ".py")
    ours = [imported for imported, _, _ in imports(path, shim) if part_of(imported)]
    assert ours == ["listenerpool.cli"]


def test_no_module_takes_another_modules_private_name() -> None:
    taken = []
    for folder in ("listenerpool", "workers", "gateway", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for imported, names, line in imports(path, module):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if imported.rpartition(".")[2].startswith("_") and imported != "__future__":
                    private.append(imported)
                if private:
                    taken.append(f"{path.relative_to(ROOT)}:{line}: {imported} {private}")
    assert not taken, "\n".join(taken)
