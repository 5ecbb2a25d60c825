"""The OpenAPI 3.1 document, generated from the pydantic models and the operations
(api/operations.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api import schemas
from api.operations import OPERATIONS, PROBLEM_RESPONSES


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi() -> dict[str, Any]:
    components: dict[str, Any] = {}

    def register(model: type[BaseModel], mode: str) -> None:
        schema = model.model_json_schema(
            ref_template="#/components/schemas/{model}",
            mode=mode,  # type: ignore[arg-type]
        )
        for name, definition in schema.pop("$defs", {}).items():
            components[name] = definition
        components[model.__name__] = schema

    paths: dict[str, Any] = {}
    register(schemas.Problem, "serialization")
    for op in OPERATIONS:
        operation: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "parameters": [
                {
                    "name": p.name,
                    "in": p.location,
                    "required": p.required,
                    "description": p.description,
                    "schema": {"type": "array", "items": p.schema} if p.repeatable else p.schema,
                    **({"style": "form", "explode": True} if p.repeatable else {}),
                }
                for p in op.params
            ],
            "responses": {},
        }
        if op.body is not None:
            register(op.body, "validation")
            operation["requestBody"] = {
                "required": op.body_required,
                "content": {
                    "application/json": {"schema": _ref(op.body)},
                    **(
                        {"application/merge-patch+json": {"schema": _ref(op.body)}}
                        if op.method == "patch"
                        else {}
                    ),
                },
            }
        if op.response is not None:
            register(op.response, "serialization")
            headers = {}
            if op.response is schemas.TaskOut:
                headers["ETag"] = {
                    "description": "The task's version, for If-Match.",
                    "schema": {"type": "string"},
                }
            if op.status == 201:
                headers["Location"] = {"schema": {"type": "string"}}
            content: dict[str, Any] = {"application/json": {"schema": _ref(op.response)}}
            if op.event_stream:
                register(schemas.FeedEvent, "serialization")
                content["text/event-stream"] = {
                    "schema": {
                        "type": "string",
                        "description": "Server-Sent Events: per event `id: <position>`, "
                        "`event: <type>`, `data:` one FeedEvent as JSON; `: keep-alive` "
                        "comments when idle. Resume with the Last-Event-ID header.",
                    },
                    "x-item-schema": _ref(schemas.FeedEvent),
                }
            if op.exports is not None:
                register(op.exports, "serialization")
                content["application/x-ndjson"] = {
                    "schema": {"type": "string", "description": "one item per line"},
                    "x-item-schema": _ref(op.exports),
                }
                content["text/csv"] = {
                    "schema": {
                        "type": "string",
                        "description": "a header row of the item's fields, then one row "
                        "per item; data as a JSON string",
                    }
                }
            operation["responses"][str(op.status)] = {
                "description": "OK" if op.status == 200 else "Created",
                "headers": headers,
                "content": content,
            }
        for code, description in op.extra_responses.items():
            content_model = (
                op.response if code.startswith("2") or op.operation_id == "readyz" else None
            )
            operation["responses"][code] = {
                "description": description,
                "content": {"application/json": {"schema": _ref(content_model)}}
                if content_model is not None
                else {"application/problem+json": {"schema": _ref(schemas.Problem)}},
            }
        for code in op.problems:
            operation["responses"][code] = {
                "description": PROBLEM_RESPONSES[code],
                "content": {"application/problem+json": {"schema": _ref(schemas.Problem)}},
            }
        if op.auth:
            operation["security"] = [
                {"ApiKeyHeader": []},
                {"ApiKeyAuthorization": []},
                {"BearerAuth": []},
            ]
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskledger",
            "version": "1.0",
            "description": "Submit tasks (Python, C# or echo), follow their status, retry, "
            "cancel, and read the full audit trail of every transition.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "ApiKeyAuthorization": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`ApiKey <key>`",
                },
                # The same key as a bearer token: what generated clients send by default.
                "BearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <key>`, the same API key",
                },
            },
        },
    }
