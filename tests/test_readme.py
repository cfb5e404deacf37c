"""The README's Python example runs as written (against a private Redis)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(30)


def test_readme_example_runs(redis_url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    [example] = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
        if "asyncio.run(main())" in block
    ]
    assert "redis://127.0.0.1:6379/0" in example
    code = example.replace("redis://127.0.0.1:6379/0", redis_url)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert "ClaimOutcome.CREATED" in result.stdout
    assert "sid='run-42'" in result.stdout
