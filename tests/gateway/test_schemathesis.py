"""Schema-driven fuzzing of the gateway's control API, in-process on fakeredis.

Every operation of ``/v1/openapi.json`` gets generated requests (valid and invalid); no answer
may be a 5xx, and every answer must match the schema (status, content type, body). The event
stream routes are left out: a valid request to one is an endless stream; their error answers
are tested in ``test_limits.py``, ``test_gateway_e2e.py`` and ``test_stream_e2e.py``.

The check that schema-valid requests are accepted is off: the schema cannot express every rule
the gateway enforces (reserved header names, the total header size, the URL grammar, the
upstream allowlist), and refusing those with a 4xx is the intended behaviour.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway import create_app
from tests.conftest import fast_settings

pytestmark = pytest.mark.timeout(300)


def gateway_on_fakeredis() -> Any:
    """The app on its own fakeredis; schemathesis runs its lifespan once, on its own loop."""
    server = fakeredis.FakeServer()
    return create_app(
        fast_settings(redis_url="redis://unused", api_rate=0),
        redis=fakeredis.FakeAsyncRedis(server=server),
        sync=fakeredis.FakeRedis(server=server),
    )


schema = schemathesis.openapi.from_asgi("/v1/openapi.json", gateway_on_fakeredis()).exclude(
    path_regex=r"/events$|^/v1/stream$"
)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_control_api_matches_its_schema_and_never_fails(case: Any) -> None:
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
