"""The examples run as a user's suite would: pytest with listenerpool's plugin, no Redis server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(120)


def test_the_example_suite_passes_on_fakeredis_alone() -> None:
    # PATH holds only the interpreter's directory: no redis-server could be started, and no
    # LP_* variable points anywhere.
    path = os.path.dirname(sys.executable)
    assert shutil.which("redis-server", path=path) is None
    env = {k: v for k, v in os.environ.items() if not k.startswith("LP_")}
    env.update({"PATH": path, "LP_REDIS_URL": ""})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout


def test_the_plugin_fixtures_are_registered(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("listenerpool")
    assert plugin is not None
    assert {"lp_pool", "lp_upstream", "lp_settings"} <= set(vars(plugin))
