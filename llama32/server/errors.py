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
                 500: "server_error", 502: "server_error"}


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
        # Its text names files on this server (paths, what could not be read): logged, never sent (issue 34)
        log.error("checkpoint error while answering a request: %s", e)
        return ApiError(500, "the model cannot serve this request; see the server log")
    log.exception("unexpected error while answering a request")
    return ApiError(500, "internal error while generating; see the server log")


_OPENAI_PATH = re.compile(r"^(/client/v4/accounts/[^/]+)?(/ai)?/v1/")


def is_openai(request: Request) -> bool:
    """OpenAI's routes: /v1/..., and Workers AI's OpenAI-compatible /ai/v1/... and /client/v4/accounts/{id}/ai/v1/..."""
    return _OPENAI_PATH.match(request.url.path) is not None


def error_body(request: Request, e: BaseException) -> tuple[ApiError, dict]:
    """`e` as an ApiError and its body in the envelope of the API the request was made to (OpenAI under
    /v1/, Workers AI elsewhere): what an error response carries, and what a stream's error event carries."""
    err = from_exception(e)
    if is_openai(request):
        body = {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.status, "invalid_request_error"),
                          "param": err.param, "code": err.status}}
    else:
        body = {"result": None, "success": False, "errors": [{"code": err.status, "message": err.message}],
                "messages": []}
    return err, body


def error_response(request: Request, e: BaseException) -> JSONResponse:
    """`e` as an HTTP answer in its API's envelope."""
    err, body = error_body(request, e)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


# The deepest nesting of objects and arrays a request body may have (issue 34: 50,000 levels raised a
# RecursionError in the parser, a 500; a few hundred could still exhaust the stack in the code walking the
# request, a schema or tool list say, after it). Far deeper than any real request (a JSON schema, tools).
MAX_JSON_DEPTH = 64


def _depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply `value`'s objects and arrays nest (0 for a scalar), found without recursion; stops
    counting once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


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
    except RecursionError:  # the parser's own limit (~1,000 levels): a client's error, not the server's
        raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if _depth(body) > MAX_JSON_DEPTH:  # what parsed may still be too deep for the code that walks it after
        raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__ if body is not None else 'nothing'}")
    return body
