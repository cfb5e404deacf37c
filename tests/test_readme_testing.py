"""The README's "Testing your backend" blocks run as printed in a project of their own: its test
file and its pytest settings only, pytest-asyncio in its default strict mode, not this
repository's pyproject.toml or conftest.py, and no warning."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
            if lang == language]  # fmt: skip


def test_the_testing_section_runs_as_printed_in_a_fresh_project(tmp_path: Path) -> None:
    section = readme_section("Testing your backend")
    [settings] = code_blocks(section, "toml")
    [test_code] = code_blocks(section, "python")
    assert "asyncio_mode" not in settings  # the snippet itself must work in strict mode
    project = tmp_path / "backend"
    project.mkdir()
    (project / "pyproject.toml").write_text(settings)
    (project / "test_backend.py").write_text(test_code)

    # As in a user's shell: no LP_* or PYTEST_* variables, and no redis-server on PATH
    # (the fixtures need none).
    path = os.path.dirname(sys.executable)
    assert shutil.which("redis-server", path=path) is None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LP_", "PYTEST_"))}
    env["PATH"] = path
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "--rootdir", str(project), "-c", str(project / "pyproject.toml"),
            "-W", "error::DeprecationWarning", "test_backend.py",
        ],
        cwd=project, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"rootdir: {project}" in result.stdout and "configfile: pyproject.toml" in output
    assert "conftest" not in output  # this repository's conftest.py played no part
    assert re.search(r"asyncio: mode=(Mode\.)?strict", result.stdout, flags=re.I)
    assert "warnings summary" not in output and "Warning" not in output, output[-4000:]
    assert re.search(r"=+ 1 passed in [\d.]+s =+", result.stdout), result.stdout[-2000:]
