"""Every error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to answer with: HTTP status, message, and the parameter it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def envelope(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    }


def error_response(error: APIError) -> JSONResponse:
    body = envelope(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def from_validation(error: ValidationError) -> APIError:
    """The first problem pydantic found, naming the field (`voice.id`, `context.0.audio`)."""
    first = error.errors()[0]
    location = list(first["loc"])
    if location[:1] == ["voice"]:
        location = ["voice"]  # not "voice.str" or "voice.VoiceRef": the union's member names
    param = ".".join(str(part) for part in location) or None
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def install_handlers(app) -> None:
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail), headers=dict(error.headers or {})))

    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}", code="internal_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
