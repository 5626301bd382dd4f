"""Request bodies: JSON whatever the Content-Type says (curl -d sends form encoding), then validated."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi.exceptions import RequestValidationError
from flashmesh.coordinator.api.errors import ApiError
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

S = TypeVar("S", bound=BaseModel)


async def parse_body(request: Request, model: type[S]) -> S:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(one line naming the bad field, its dotted path): of a union's errors, the deepest one (the
    member the body was closest to)."""
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument: {param}", param
    message = str(first.get("msg", "invalid request"))
    return (f"{param}: {message}" if param else message), param
