"""OpenAI-style error responses: every failure the ingress returns has the body
``{"error": {"message", "type", "param", "code"}}`` and never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException

from attnscope.protocol import ErrorDetail, ErrorResponse, RequestFieldError

logger = logging.getLogger("ray.serve")


ENGINE_LOST = "the engine replica serving this request failed; retry the request"


class ApiError(Exception):
    """A request the ingress refuses, with the HTTP status and the field to blame."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    @classmethod
    def bad_field(cls, exc: RequestFieldError) -> ApiError:
        """HTTP 400 for an invalid request value."""
        return cls(400, str(exc), exc.field, "invalid_value")

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return JSONResponse(ErrorResponse(error=self.detail).model_dump(), status_code=self.status, headers=self.headers)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _validation_param(exc: RequestValidationError) -> str | None:
    """The dotted field path of the first validation error (``messages.0.role``), as the client spelled it.

    FastAPI's ``body`` prefix is dropped, and so is what pydantic appends inside union
    fields (``prompt`` → ``list[int]`` → ``1``): the union member tags are type names.
    """
    errors = exc.errors()
    if not errors:
        return None
    loc = list(errors[0].get("loc", ()))
    if loc[:1] == ["body"]:
        loc = loc[1:]
    path: list[str] = []
    for part in loc:
        if isinstance(part, str) and (not part.isidentifier() or part in _UNION_TAGS):
            break
        path.append(str(part))
    return ".".join(path) or None


def install_error_handlers(app: FastAPI) -> None:
    """Turn every exception the routes can raise into an OpenAI-style error response."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestFieldError)
    async def _field_error(_: Request, exc: RequestFieldError) -> JSONResponse:
        return ApiError.bad_field(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        param = _validation_param(exc)
        message = errors[0]["msg"] if errors else "invalid request"
        return ApiError(400, f"invalid {param}: {message}" if param else message, param, "invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), None, code, dict(exc.headers or {})).response()

    @app.exception_handler(RayActorError)
    async def _engine_lost(_: Request, exc: RayActorError) -> JSONResponse:
        logger.warning("engine replica lost: %s", exc)
        return ApiError(503, ENGINE_LOST, None, "engine_unavailable", {"Retry-After": "1"}).response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return ApiError(500, "internal server error", type="internal_error").response()
