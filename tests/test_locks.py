"""The committed locks pin every package the project's own installs take, and cover every
dependency pyproject.toml names (a dependency added without re-running requirements/compile
would install unpinned)."""

from __future__ import annotations

import re
import tomllib

import pytest

from listenerpool.testing.harness.processes import ROOT

LOCKS = {"runtime": [], "test": ["test"]}


def pins(lock: str) -> dict[str, str]:
    found = {}
    for line in (ROOT / f"requirements/{lock}.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = line.split(";")[0].strip()
            name, sep, version = requirement.partition("==")
            assert sep, f"requirements/{lock}.txt: {line!r} is not pinned with =="
            found[canonical(name)] = version
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: list[str]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    names = set()
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert match, requirement
        names.add(canonical(match.group()))
    return names


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_pins_every_declared_dependency(lock: str) -> None:
    missing = declared(LOCKS[lock]) - set(pins(lock))
    assert not missing, f"requirements/{lock}.txt lacks {sorted(missing)}: run requirements/compile"


def test_both_locks_agree_on_shared_packages() -> None:
    runtime, test = pins("runtime"), pins("test")
    differ = {name: (v, test.get(name)) for name, v in runtime.items() if test.get(name) != v}
    assert not differ, f"runtime and test locks disagree: {differ}"
