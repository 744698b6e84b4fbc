"""`python -m llama32 serve`: the Workers AI REST API and an OpenAI-compatible API over one loaded handle.

An app factory (`create_app`), one module per API shape (`workers_ai.py`, `openai_api.py`), one place that turns
errors into each shape's envelope (`errors.py`), and the playground as a static page. Routes translate between
HTTP and the library's request/response shapes and delegate: every request goes through `llama32.generate` (or
`score`) on the shared handle, whose generation loop batches all requests in flight, so concurrent clients
share forward passes. The library's blocking calls run on worker threads; a client that disconnects mid-stream
closes its stream, which cancels its request in the loop.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

import llama32
from llama32 import lora as lora_mod
from llama32.hub import weights_dir

from . import docs
from .errors import ApiError, error_response, json_body

log = logging.getLogger("llama32.server")
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 4 << 20  # a prompt may be 131072 characters, a conversation several such messages
DEFAULT_MAX_QUEUE = 64
# One answer for every `lora` that is not an adapter of --lora-dir (a path, `..`, an absolute or unknown name),
# so a client learns nothing about the server's files from it.
UNKNOWN_LORA = "lora: not the name of an adapter this server offers (a folder name in its --lora-dir)"


class Backend:
    """The handle and the limits every route shares."""

    def __init__(self, llm: llama32.Llama, *, model_name: str, max_queue: int, max_body: int,
                 lora_dir: str | Path):
        self.llm, self.model_name, self.max_queue, self.max_body = llm, model_name, max_queue, max_body
        self.lora_dir = Path(lora_dir)

    async def adapter(self, fields: dict) -> dict:
        """`fields` with its `lora` (an adapter *name*) replaced by that adapter's folder in `lora_dir`, loaded
        (and cached) here; anything but such a name is the one UNKNOWN_LORA 400."""
        name = fields.get("lora")
        if name is None:
            return fields
        path = lora_mod.named(self.lora_dir, name)
        if path is None:
            raise ApiError(400, UNKNOWN_LORA, param="lora")
        await run_in_threadpool(lambda: lora_mod.resolve(self.llm, str(path), name=name))
        return dict(fields, lora=str(path))

    async def body(self, request: Request) -> dict:
        return await json_body(request, self.max_body)

    def admit(self) -> None:
        """503 when the loop already has `max_queue` requests waiting: shed load rather than queue forever."""
        if self.llm.loop.stats()["waiting"] >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.max_queue} requests are waiting); retry shortly",
                           headers={"Retry-After": "1"})

    async def generate(self, request: Request, fields: dict) -> dict:
        self.admit()
        out = await run_in_threadpool(lambda: llama32.generate(self.llm, **fields))
        request.state.tokens = out["usage"]["completion_tokens"]
        return out

    async def stream(self, request: Request, fields: dict, meta: dict | None = None) -> AsyncIterator[dict]:
        """Validate (errors raise here, before any response starts), then an async iterator of chunks.
        Once it is exhausted, `meta["finish_reason"]` says why the request ended."""
        stream = await run_in_threadpool(lambda: llama32.generate(self.llm, stream=True, **fields))
        self.admit()
        return self._chunks(request, stream, {} if meta is None else meta)

    async def _chunks(self, request: Request, stream, meta: dict) -> AsyncIterator[dict]:
        started = time.perf_counter()
        tokens = 0
        try:
            while True:
                chunk = await run_in_threadpool(next, stream, None)
                if chunk is None:
                    meta["finish_reason"] = stream.finish_reason
                    return
                if "usage" in chunk:
                    tokens = chunk["usage"]["completion_tokens"]
                yield chunk
        finally:
            stream.close()  # a disconnected client lands here: its row leaves the batch
            log.info("%s %s stream end tokens=%d %.3fs", request.method, request.url.path, tokens,
                     time.perf_counter() - started)


class _AccessLog(BaseHTTPMiddleware):
    """The bearer-token check, and one log line per request: route, status, tokens, seconds."""

    # need no key: they hold nothing (the playground's and /docs' calls send one)
    OPEN = ("/", "/health", "/favicon.ico", *docs.OPEN)

    def __init__(self, app, api_key: str | None):
        super().__init__(app)
        self.api_key = api_key.encode() if api_key else None

    def authorized(self, request: Request) -> bool:
        """`Authorization: Bearer KEY` (the scheme in any case), compared in constant time."""
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    async def dispatch(self, request: Request, call_next):
        started = time.perf_counter()
        request.state.tokens = 0
        if self.api_key and request.url.path not in self.OPEN and not self.authorized(request):
            response = error_response(request, ApiError(401, "missing or wrong API key: send "
                                                              "'Authorization: Bearer <key>'"))
        else:
            response = await call_next(request)
        log.info("%s %s %d tokens=%d %.3fs", request.method, request.url.path, response.status_code,
                 request.state.tokens, time.perf_counter() - started)
        return response


def create_app(llm: llama32.Llama, *, api_key: str | None = None, model_name: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_body: int = DEFAULT_MAX_BODY,
               lora_dir: str | Path | None = None) -> Starlette:
    """The ASGI app serving `llm` (run it with uvicorn, as `python -m llama32 serve` does). A request's `lora`
    may only name an adapter folder in `lora_dir` (default `weights/loras/`)."""
    from . import openai_api, workers_ai

    backend = Backend(llm, model_name=model_name or Path(str(llm.path)).name, max_queue=max_queue,
                      max_body=max_body,
                      lora_dir=lora_dir if lora_dir is not None else weights_dir() / "loras")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": backend.model_name, **llm.loop.stats()})

    async def playground(request: Request) -> FileResponse:
        return FileResponse(STATIC / "playground.html", media_type="text/html")

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such path: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(request, ApiError(exc.status_code, message))

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    routes = [Route("/", playground, methods=["GET"]), Route("/health", health, methods=["GET"]),
              *workers_ai.routes(backend), *openai_api.routes(backend), *docs.routes(backend.model_name)]
    return Starlette(routes=routes, middleware=[Middleware(_AccessLog, api_key=api_key)],
                     exception_handlers={HTTPException: on_http_error, Exception: on_api_error})


def handler(backend_method):
    """Route decorator: any error a route raises becomes its API's envelope."""
    async def endpoint(request: Request):
        try:
            return await backend_method(request)
        except Exception as e:  # noqa: BLE001 - mapped in one place
            return error_response(request, e)
    return endpoint


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int | None = None,
          api_key: str | None = None, device: str | None = None, dtype: str | None = None,
          lora: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, lora_dir: str | Path | None = None) -> None:
    """Load `model` and serve it until SIGINT or SIGTERM, then finish the requests in flight and return."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version raises the signal again once it has shut down, so the process would die of
            # it; here a signal only asks for the graceful shutdown, and `serve` returns normally.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    llm = llama32.load(model, device=device, dtype=dtype, lora=lora, max_batch=max_batch)
    app = create_app(llm, api_key=api_key or os.environ.get("LLAMA32_API_KEY") or None, max_queue=max_queue,
                     model_name=model.rstrip("/").split("/")[-1], lora_dir=lora_dir)
    log.info("serving %s on http://%s:%d (max_batch=%d)", model, host, port, llm.loop.max_batch)
    Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    llm.loop.close()
    log.info("shut down")


async def sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-Sent Events of JSON chunks, exactly what `llama32.to_sse` writes, as an async iterator."""
    async for chunk in chunks:
        yield next(llama32.to_sse([chunk]))
    yield "data: [DONE]\n\n"

