"""The one place where refusals become HTTP answers: OpenAI-style JSON errors
``{"error": {"message", "type", "param", "code"}}`` with a 4xx (or 5xx) status.

Routes raise :class:`APIError`; FastAPI's own refusals (a body that fails validation, an unknown path
or method) and crashes are answered in the same shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignloop.serve.schemas import ErrorDetail, ErrorResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


async def api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)


async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    """The first validation error, named by its field (``messages.0.role``), as a 400."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid" or not loc:
        return error_response(400, "the request body must be a JSON object", code="invalid_json")
    param = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        return error_response(400, f"{param}: this server does not support this field", param=param,
                              code="unsupported_parameter")
    return error_response(400, f"{param}: {err['msg']}", param=param, code=err.get("type"))


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))


async def crash(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


def add_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crash)
