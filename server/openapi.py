"""OpenAPI for routes that parse their own bodies (to answer in fal's shapes, queue mode included)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.schemas import APPS, ErrorBody, ValidationErrorBody

_REF = "#/components/schemas/{model}"


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the error answers a route can give: fal's 422 model errors, request errors else."""
    return {
        code: {
            "model": ValidationErrorBody if code == 422 else ErrorBody,
            "description": HTTPStatus(code).phrase,
        }
        for code in codes
    }


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` that documents `model` as the JSON request body."""
    content = {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    return {"requestBody": {"required": True, "content": content}}


def install(app: FastAPI) -> None:
    """Add the input models' schemas to the generated document, which does not see them otherwise."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in APPS.values():
                model_schema = model.model_json_schema(ref_template=_REF)
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
