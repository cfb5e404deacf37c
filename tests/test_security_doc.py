"""docs/security.md names a test for every protection; each named test exists, and every
setting the limits table names is a real setting described in the README."""

from __future__ import annotations

import re

from listenerpool.settings import Settings
from tests.conftest import ROOT

DOC = (ROOT / "docs" / "security.md").read_text()


def test_every_table_row_names_a_test_that_exists() -> None:
    rows = [line for line in DOC.splitlines() if line.startswith("| ") and "---" not in line]
    table_rows = [row for row in rows if row.count("|") >= 5 and not row.startswith("| input")]
    table_rows = [r for r in table_rows if not r.startswith(("| limit |", "| request |"))]
    assert len(table_rows) >= 25
    for row in table_rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert refs, f"row names no test: {row}"
        for path, name in refs:
            source = (ROOT / path).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{path}::{name} missing"


def test_every_named_setting_exists_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`LP_([A-Z_]+)`", DOC))
    assert {"UPSTREAM_ALLOW", "MAX_CLIENTS", "API_RATE", "HEAD_TIMEOUT"} <= named
    for name in named:
        assert name.lower() in Settings.model_fields, f"LP_{name} is not a setting"
        assert f"`LP_{name}`" in readme, f"LP_{name} missing from the README"
