"""The Workers AI REST shape: `POST .../ai/run/@cf/meta/llama-3.2-1b-instruct`, a request body in, the
`{"result", "success", "errors", "messages"}` envelope out, or Server-Sent Events with `"stream": true`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import Backend, event_stream, handler
from .errors import ApiError

MODEL = "@cf/meta/llama-3.2-1b-instruct"


def routes(backend: Backend) -> list[Route]:
    async def run(request: Request):
        if request.path_params["model"] != MODEL:
            raise ApiError(404, f"no such model: {request.path_params['model']}; this server runs {MODEL}")
        body = await backend.body(request)  # every field is the library's to check (llama32.generate)
        body = await backend.adapter(body)  # but `lora` may only name an adapter of --lora-dir
        if body.get("stream"):
            fields = {k: v for k, v in body.items() if k != "stream"}
            [gen] = await backend.stream(request, fields)
            return event_stream(request, gen.chunks())
        [out] = await backend.generate(request, body)
        if body.get("response_format") is not None and out.get("finish_reason") == "length":
            # Workers AI's JSON mode error; the library's result keeps the partial text and finish_reason
            raise ApiError(400, "JSON Mode couldn't be met: max_tokens ended the answer before its JSON was "
                                f"complete ({out['usage']['completion_tokens']} tokens); raise max_tokens")
        return JSONResponse({"result": out, "success": True, "errors": [], "messages": []})

    endpoint = handler(run, "/ai/run")
    return [Route("/client/v4/accounts/{account_id}/ai/run/{model:path}", endpoint, methods=["POST"]),
            Route("/ai/run/{model:path}", endpoint, methods=["POST"])]
