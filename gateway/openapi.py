"""The gateway's OpenAPI schema as the gateway actually answers.

FastAPI documents a 422 validation response on every route with parameters or a body; the
gateway answers validation failures with 400 and its JSON error body (documented per route),
so the 422 entries and their schemas are removed. The ``/v1/stream`` frames, which OpenAPI
cannot attach to a WebSocket, are added as components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.stream_schema import FRAME_MODELS


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=app.description
            )
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for model in FRAME_MODELS:
                components[model.__name__] = model.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
