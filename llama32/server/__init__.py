"""`python -m llama32 serve`: the Workers AI REST API and an OpenAI-compatible API over one loaded handle, or
(`--replicas N`) over N Ray Serve replicas of it (`ray.py`).

An app factory (`create_app`), one module per API shape (`workers_ai.py`, `openai_api.py`), one place that turns
errors into each shape's envelope (`errors.py`), what the routes share (`backend.py`: the back end they call,
requests read from the event loop, no thread per request), `/metrics` (`metrics.py`), and the playground as a
static page. Routes translate between HTTP and the library's request/response shapes and delegate to the back
end: the handle's generation loop, which batches all requests in flight, or replicas that each hold one. The
contract is docs/API.md, "Serving".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import llama32
from llama32.hub import weights_dir

from . import docs
from .backend import UNKNOWN_LORA, Backend, ClientGone  # noqa: F401 - UNKNOWN_LORA for callers and tests
from .errors import ApiError, error_body, error_response

log = logging.getLogger("llama32.server")
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 4 << 20  # a prompt may be 131072 characters, a conversation several such messages
DEFAULT_MAX_QUEUE = 64
# Proxies (nginx) buffer a response unless told not to; a stream must reach the client token by token.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Gate:
    """Outermost of the app's own layers (plain ASGI, so streams and disconnects pass through untouched): the
    bearer-key check, the `x-llama32-replica` header (the replicas that generated the answer, else the back
    end's `replica`), then one log line and one metrics count per request once its answer has been sent
    (route, status, the tokens its generations really produced, seconds)."""

    # need no key: they hold nothing (the playground's and /docs' calls send one)
    OPEN = ("/", "/health", "/favicon.ico", *docs.OPEN)

    def __init__(self, app, api_key: str | None, metrics, replica: str | None):
        self.app, self.metrics, self.replica = app, metrics, replica
        self.api_key = api_key.encode() if api_key else None

    def authorized(self, request: Request) -> bool:
        """`Authorization: Bearer KEY` (the scheme in any case), compared in constant time."""
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, responded = time.perf_counter(), [500], []
        request = Request(scope, receive)
        state = scope.setdefault("state", {})

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                responded.append(True)
                gens = state.get("generations", [])
                replicas = ",".join(dict.fromkeys(g.replica for g in gens if g.replica)) or self.replica
                if replicas:
                    message = dict(message, headers=[*message.get("headers", []),
                                                     (b"x-llama32-replica", replicas.encode())])
            await send(message)

        try:
            if self.api_key and scope["path"] not in self.OPEN and not self.authorized(request):
                response = error_response(request, ApiError(401, "missing or wrong API key: send "
                                                                 "'Authorization: Bearer <key>'"))
                await response(scope, receive, tracked)
            else:
                await self.app(scope, receive, tracked)
        except asyncio.CancelledError:  # the request was cancelled (Ray Serve's proxy does when its client leaves)
            if not responded:  # before any response started: logged as nginx's "client closed request"
                status[0] = 499
            raise
        finally:
            gens = state.get("generations", [])
            route = state.get("route", "other")
            log.info("%s %s %d tokens=%d %.3fs", scope["method"], scope["path"], status[0],
                     sum(g.produced for g in gens), time.perf_counter() - started)
            if self.metrics is not None:
                self.metrics.request(route, status[0])


def create_app(llm: llama32.Llama | Backend, *, api_key: str | None = None, model_name: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_body: int = DEFAULT_MAX_BODY,
               lora_dir: str | Path | None = None, allowed_origins: list[str] | None = None) -> Starlette:
    """The ASGI app serving `llm` (run it with uvicorn, as `python -m llama32 serve` does), or serving from a
    back end made elsewhere (server/ray.py's replicas; `model_name`, `max_queue`, `max_body` and `lora_dir`
    are then the back end's). A request's `lora` may only name an adapter folder in `lora_dir` (default
    `weights/loras/`); `allowed_origins` are the browser origins allowed to call it (CORS; none by default)."""
    from . import openai_api, workers_ai
    from .metrics import CONTENT_TYPE_LATEST, Metrics

    metrics = Metrics()
    if isinstance(llm, Backend):
        backend = llm
    else:
        backend = Backend(llm, model_name=model_name or Path(str(llm.path)).name, max_queue=max_queue,
                          max_body=max_body, lora_dir=lora_dir if lora_dir is not None else weights_dir() / "loras")
    backend.metrics = metrics

    async def health(request: Request) -> JSONResponse:
        replicas = await backend.replicas()  # each replica's loop stats; the counts are summed over them
        totals = {k: sum(r[k] for r in replicas) for k in ("running", "waiting", "paused", "kv_bytes",
                                                            "kv_bytes_total")}
        return JSONResponse({"status": "ok", "model": backend.model_name, **totals, "replicas": replicas})

    page = docs.playground_page((STATIC / "playground.html").read_text())  # its controls from the schema

    async def playground(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def favicon(request: Request) -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    async def scrape(request: Request) -> Response:
        return Response(metrics.render(await backend.replicas()), media_type=CONTENT_TYPE_LATEST)

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such path: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(request, ApiError(exc.status_code, message))

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    routes = [Route("/", playground, methods=["GET"]), Route("/favicon.ico", favicon, methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/metrics", scrape, methods=["GET"]),
              *workers_ai.routes(backend), *openai_api.routes(backend), *docs.routes(backend.model_name)]
    middleware = []
    if allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=["x-llama32-replica"]))
    middleware.append(Middleware(_Gate, api_key=api_key, metrics=metrics, replica=backend.replica))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: on_http_error, Exception: on_api_error})


def handler(route_method, route: str):
    """Route decorator: any error a route raises becomes its API's envelope; `route` labels its metrics."""
    async def endpoint(request: Request):
        request.state.route = route
        try:
            return await route_method(request)
        except ClientGone:  # nobody reads it; the log and metrics show nginx's code for "client closed"
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - mapped in one place
            return error_response(request, e)
    return endpoint


def event_stream(request: Request, chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-Sent Events of JSON chunks (what `llama32.to_sse` writes), with headers that keep proxies
    from buffering them. A stream that fails once started (its replica died, the loop failed) ends with one
    event holding the error in its API's envelope, and no `[DONE]`."""
    async def text():
        try:
            async for chunk in chunks:
                yield next(llama32.to_sse([chunk]))
        except Exception as e:  # noqa: BLE001 - the answer has started: the error can only be an event
            yield next(llama32.to_sse([error_body(request, e)[1]]))
            return
        yield "data: [DONE]\n\n"
    return StreamingResponse(text(), media_type="text/event-stream", headers=SSE_HEADERS)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int | None = None,
          api_key: str | None = None, device: str | None = None, dtype: str | None = None,
          lora: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE, lora_dir: str | Path | None = None,
          quantize: str | None = None, kv_cache_bytes: int | None = None, served_model_name: str | None = None,
          allowed_origins: list[str] | None = None, speculative: str | None = None) -> None:
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
    llm = llama32.load(model, device=device, dtype=dtype, lora=lora, max_batch=max_batch, quantize=quantize,
                       kv_cache_bytes=kv_cache_bytes, speculative=speculative)
    app = create_app(llm, api_key=api_key or os.environ.get("LLAMA32_API_KEY") or None, max_queue=max_queue,
                     model_name=served_model_name or model.rstrip("/").split("/")[-1], lora_dir=lora_dir,
                     allowed_origins=allowed_origins)
    log.info("serving %s on http://%s:%d (max_batch=%d)", model, host, port, llm.loop.max_batch)
    Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    llm.loop.close()
    log.info("shut down")
