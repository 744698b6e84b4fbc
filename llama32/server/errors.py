"""The one place where errors become HTTP answers: each API shape's envelope, and the body checks both share.

`InvalidRequest` (the library's own validation: one source of truth) is a 400 with its text; a malformed or
oversized body, an unknown path, a wrong method, a missing key and a full queue get their own statuses. An
unexpected error is logged here and answered with a plain 500: never a traceback to a client.
"""

from __future__ import annotations

import json
import logging
import re

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import CheckpointError, InvalidRequest

log = logging.getLogger("llama32.server")

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded",
                 500: "server_error"}


class ApiError(Exception):
    """An answer other than success: HTTP status, message, and (OpenAI) the offending parameter."""

    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def from_exception(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e))
    if isinstance(e, CheckpointError):
        return ApiError(500, f"the model cannot serve this: {e}")
    log.exception("unexpected error while answering a request")
    return ApiError(500, "internal error while generating; see the server log")


_OPENAI_PATH = re.compile(r"^(/client/v4/accounts/[^/]+)?(/ai)?/v1/")


def is_openai(request: Request) -> bool:
    """OpenAI's routes: /v1/..., and Workers AI's OpenAI-compatible /ai/v1/... and /client/v4/accounts/{id}/ai/v1/..."""
    return _OPENAI_PATH.match(request.url.path) is not None


def error_response(request: Request, e: BaseException) -> JSONResponse:
    """`e` in the envelope of the API the request was made to (OpenAI under /v1/, Workers AI elsewhere)."""
    err = from_exception(e)
    if is_openai(request):
        body = {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.status, "invalid_request_error"),
                          "param": err.param, "code": err.status}}
    else:
        body = {"result": None, "success": False, "errors": [{"code": err.status, "message": err.message}],
                "messages": []}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


async def json_body(request: Request, max_bytes: int) -> dict:
    """The request body as a JSON object, read up to `max_bytes` (413 past that), else a 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body is {declared} bytes; at most {max_bytes} are accepted")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > max_bytes:
            raise ApiError(413, f"request body is over {max_bytes} bytes, the most accepted")
    try:
        body = json.loads(bytes(data) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__ if body is not None else 'nothing'}")
    return body
