"""The image installs what CI tested and runs as an unprivileged user (no Docker daemon here:
the Dockerfile is read, and what it installs is checked against the lock)."""

from __future__ import annotations

import re
import shlex

from listenerpool.testing.harness.processes import ROOT


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_the_image_installs_from_the_runtime_lock() -> None:
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    installs = [shlex.split(run) for run in runs if "pip install" in run]
    assert installs, "the Dockerfile installs nothing with pip"
    for words in installs:
        assert "-c" in words, f"pip install without the lock: {words}"
        assert words[words.index("-c") + 1] == "requirements/runtime.txt"
    copied = " ".join(rest for keyword, rest in instructions() if keyword == "COPY")
    assert "requirements/runtime.txt" in copied


def test_every_copied_path_exists() -> None:
    for keyword, rest in instructions():
        if keyword == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def test_the_image_runs_as_an_unprivileged_user() -> None:
    users = [rest for keyword, rest in instructions() if keyword == "USER"]
    assert users, "no USER: the services would run as root"
    assert users[-1] not in ("root", "0", "0:0")
    # The user it switches to is created in the image.
    runs = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    assert re.search(rf"useradd\b.*\b{re.escape(users[-1])}\b", runs)
