"""The API described: the model's JSON Schemas where Workers AI serves them, `/openapi.json` (OpenAPI 3.1, both
API shapes) and `/docs` (Swagger UI over it).

Everything here is derived from `llama32.schema()` (llama32/schemas.py), the same document `generate`
validates with: the Workers AI request body *is* the input schema, the result is its output schema, and the
OpenAI routes' sampling fields reuse its field definitions, so ranges and defaults are written once. Swagger
UI's files come from the `swagger-ui-py` package (the `serve` extra) and are served by this app: `/docs` needs
nothing from the internet.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.routing import Route

import llama32
from llama32.schemas import MESSAGES_FORM, MODEL, PROMPT_FORM

from .errors import ApiError, error_response

# Swagger UI's own files, served beside the page (no CDN is reachable from a test or an air-gapped machine)
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")
OPEN = ("/openapi.json", "/docs", *(f"/docs/{a}" for a in ASSETS))  # need no key: they hold nothing

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llama32 API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  tryItOutEnabled: true, persistAuthorization: true});</script>
</body></html>
"""


# The playground's sampling controls, in this order; each one's range, default and help come from the schema.
PLAYGROUND_FIELDS = ("temperature", "top_p", "top_k", "seed", "max_tokens", "repetition_penalty",
                     "frequency_penalty", "presence_penalty")
PLAYGROUND_MARK = "/*CONTROLS*/[]"  # in playground.html's script, where the controls' table goes


def controls(fields: tuple[str, ...] = PLAYGROUND_FIELDS) -> list[dict]:
    """The playground's controls: `{name, min, max, step, value, title}` from each field's schema (the default
    as the value; "" when the field has none, so nothing is sent), so the page and the validation cannot
    disagree. The browser itself refuses a value outside `min`..`max`."""
    out = []
    for name in fields:
        d = MESSAGES_FORM["properties"][name]
        c = {"name": name, "min": d["minimum"], "step": 1 if d["type"] == "integer" else "any",
             "value": str(d.get("default", "")), "title": d["description"]}
        if "maximum" in d:
            c["max"] = d["maximum"]
        out.append(c)
    return out


def playground_page(template: str) -> str:
    """The playground page (`template`: static/playground.html) with its controls' table filled in."""
    if PLAYGROUND_MARK not in template:
        raise ValueError(f"the playground page has no {PLAYGROUND_MARK} for its controls")
    table = json.dumps(controls()).replace("</", "<\\/")  # a JSON literal inside <script>
    return template.replace(PLAYGROUND_MARK, table)


def _assets_dir() -> Path | None:
    spec = importlib.util.find_spec("swagger_ui")  # located, not imported: only its static files are used
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "static"
    return path if (path / ASSETS[0]).is_file() else None


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _envelope(result: dict) -> dict:
    return {"type": "object", "properties": {
        "result": result, "success": {"type": "boolean"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "code": {"type": "integer"}, "message": {"type": "string"}}}},
        "messages": {"type": "array"}}, "required": ["result", "success", "errors", "messages"]}


def _openai_request(kind: str) -> dict:
    """The OpenAI bodies: their own fields, the sampling fields as the library's schema defines them."""
    common = PROMPT_FORM["properties"]
    same = {k: copy.deepcopy(common[k]) for k in ("temperature", "top_p", "top_k", "seed", "frequency_penalty",
                                                   "presence_penalty", "repetition_penalty", "stop", "lora",
                                                   "logit_bias", "response_format")}
    props = {
        "model": {"type": "string", "description": "Any id; this server runs one model (GET /v1/models)."},
        "max_tokens": copy.deepcopy(common["max_tokens"]),
        "stream": {"type": "boolean", "default": False, "description": "Server-Sent Events of chunks."},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"type": "integer", "minimum": 1, "default": 1, "description": "Choices per request."},
        "user": {"type": "string"},
        **same,
    }
    if kind == "chat":
        props.update({
            "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                "content": {"type": ["string", "array", "null"], "description": "Text, or a list of "
                            "{type: 'text', text} parts."},
                "tool_calls": {"type": "array", "items": {"type": "object"}},
                "tool_call_id": {"type": "string"}, "name": {"type": "string"}}, "required": ["role"]}},
            "max_completion_tokens": copy.deepcopy(common["max_tokens"]),
            "tools": {"type": "array", "items": {"type": "object", "properties": {
                "type": {"const": "function"}, "function": {"type": "object", "properties": {
                    "name": {"type": "string"}, "description": {"type": "string"},
                    "parameters": {"type": "object"}}, "required": ["name"]}}}},
            "tool_choice": {"description": "'auto', 'none', 'required' or {type: 'function', function: {name}}: the "
                            "last two constrain the answer to one call of the offered tools (JSON mode)."},
            "logprobs": {"type": "boolean", "default": False},
            "top_logprobs": copy.deepcopy(common["top_logprobs"]),
        })
        required = ["messages"]
    else:
        props.update({
            "prompt": {"description": "A string, a list of strings, a list of token ids or a list of such lists.",
                       "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                 {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                 {"type": "array", "items": {"type": "array",
                                                             "items": {"type": "integer", "minimum": 0}}}]},
            "echo": {"type": "boolean", "default": False, "description": "Return the prompt before the answer."},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                         "description": "Log-probabilities of this many most likely tokens per position."},
        })
        required = ["prompt"]
    return {"type": "object", "properties": props, "required": required}


def openapi(model_name: str) -> dict:
    """The OpenAPI 3.1 description of both API shapes this server speaks."""
    s = llama32.schema()
    result = s["output"]["oneOf"][0]
    chunk = s["output"]["$defs"]["chunk"]
    bad = {"description": "A bad request: the error names the field, its allowed range, the value given.",
           "content": {"application/json": {"schema": _ref("WorkersAIError")}}}

    def wai_run(account: bool) -> dict:
        op = {"post": {
            "tags": ["Workers AI"], "summary": f"Run {MODEL}",
            "operationId": "run_account" if account else "run",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("WorkersAIInput"),
                "examples": {"prompt": {"value": {"prompt": "Where did the phrase Hello World come from",
                                                  "max_tokens": 32}},
                             "messages": {"value": {"messages": [
                                 {"role": "system", "content": "You are a friendly assistant"},
                                 {"role": "user", "content": "Why is pizza so good"}], "max_tokens": 32}}}}}},
            "responses": {
                "200": {"description": "The result in Workers AI's envelope; with stream, Server-Sent Events "
                                       "(`data: <chunk>` each, then `data: [DONE]`).",
                        "content": {"application/json": {"schema": _ref("WorkersAIRunResponse")},
                                    "text/event-stream": {"schema": {"type": "string"},
                                                          "x-event-schema": _ref("StreamChunk")}}},
                "400": bad, "404": {"description": "Another model, or no such path."}}}}
        if account:
            op["post"]["parameters"] = [_ACCOUNT]
        return op

    schema_op = {"get": {
        "tags": ["Workers AI"], "summary": "The model's input and output JSON Schemas",
        "operationId": "model_schema",
        "parameters": [_ACCOUNT, {"name": "model", "in": "query", "required": True,
                                  "schema": {"type": "string", "default": MODEL}}],
        "responses": {"200": {"description": "{input, output} as JSON Schema (draft 2020-12), in the envelope.",
                              "content": {"application/json": {"schema": _ref("WorkersAISchemaResponse")}}},
                      "400": bad, "404": {"description": "No such model."}}}}
    oai_bad = {"description": "A bad request, in OpenAI's error shape.",
               "content": {"application/json": {"schema": _ref("OpenAIError")}}}

    from .openai_api import MAX_N, PREFIXES  # imported here: openai_api imports the package this module is in

    def params(prefix: str) -> dict:
        return {"parameters": [_ACCOUNT]} if "{account_id}" in prefix else {}

    def oai(prefix: str, kind: str, summary: str) -> dict:
        return {"post": {"tags": ["OpenAI"], "summary": summary, "operationId": _op_id(prefix, kind),
                         **params(prefix),
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": _ref("ChatCompletionRequest" if kind == "chat" else "CompletionRequest")}}},
                         "responses": {"200": {"description": "OpenAI's completion object; with stream, "
                                                              "Server-Sent Events of chunks, then [DONE].",
                                               "content": {"application/json": {"schema": {"type": "object"}},
                                                           "text/event-stream": {"schema": {"type": "string"}}}},
                                       "400": oai_bad}}}

    def listing(prefix: str, one: bool) -> dict:
        op = {"get": {"tags": ["OpenAI"], "summary": "The served model" + ("" if one else "s (one)"),
                      "operationId": _op_id(prefix, "model" if one else "models"), **params(prefix),
                      "responses": {"200": {"description": "A model object" if one else
                                            "{object: 'list', data: [model]}",
                                            "content": {"application/json": {"schema": {"type": "object"}}}}}}}
        if one:
            op["get"]["parameters"] = op["get"].get("parameters", []) + [
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
            op["get"]["responses"]["404"] = oai_bad
        return op

    paths = {
        f"/ai/run/{MODEL}": wai_run(False),
        f"/client/v4/accounts/{{account_id}}/ai/run/{MODEL}": wai_run(True),
        "/client/v4/accounts/{account_id}/ai/models/schema": schema_op,
    }
    for prefix in PREFIXES:
        paths[f"{prefix}/chat/completions"] = oai(prefix, "chat", "Chat completion")
        paths[f"{prefix}/completions"] = oai(prefix, "completions", "Text completion (raw prompt)")
        paths[f"{prefix}/models"] = listing(prefix, False)
        paths[f"{prefix}/models/{{model_id}}"] = listing(prefix, True)
    status = {"description": "Status, the running/waiting counts and KV memory, in all and per replica",
              "content": {"application/json": {"schema": {"type": "object"}}}}
    paths["/health"] = {"get": {"tags": ["Server"], "summary": "200 once the model is loaded",
                                "operationId": "health", "security": [], "responses": {"200": status}}}
    paths["/metrics"] = {"get": {"tags": ["Server"], "summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "Prometheus' text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
    chat_request, completion_request = _openai_request("chat"), _openai_request("completions")
    for body in (chat_request, completion_request):
        body["properties"]["n"]["maximum"] = MAX_N
    return {
        "openapi": "3.1.0",
        "info": {"title": f"llama32: {model_name}", "version": "0.1.0",
                 "description": "Workers AI's REST API for llama-3.2-1b-instruct and an OpenAI-compatible API over "
                                "one loaded model. The request schema is the one `generate` validates with."},
        "security": [{}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Only when the server runs with --api-key."}},
            "schemas": {
                "WorkersAIInput": s["input"], "WorkersAIResult": result, "StreamChunk": chunk,
                "WorkersAIRunResponse": _envelope(_ref("WorkersAIResult")),
                "WorkersAISchemaResponse": _envelope({"type": "object", "properties": {
                    "input": {"type": "object"}, "output": {"type": "object"}}, "required": ["input", "output"]}),
                "WorkersAIError": _envelope({"type": "null"}),
                "ChatCompletionRequest": chat_request, "CompletionRequest": completion_request,
                "OpenAIError": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {}}}}, "required": ["error"]},
            },
        },
    }


def _op_id(prefix: str, kind: str) -> str:
    where = {"/v1": "", "/ai/v1": "_ai"}.get(prefix, "_account")
    return f"openai_{kind}{where}"


_ACCOUNT = {"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"}}


def routes(model_name: str) -> list[Route]:
    document = openapi(model_name)  # built once: it describes the server, not a request

    async def model_schema(request: Request) -> JSONResponse:
        model = request.query_params.get("model")
        if model is None:
            return error_response(request, ApiError(400, f"model: required query parameter, e.g. ?model={MODEL}"))
        if model != MODEL:
            return error_response(request, ApiError(404, f"no such model: {model}; this server runs {MODEL}"))
        return JSONResponse({"result": llama32.schema(), "success": True, "errors": [], "messages": []})

    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(document)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(_PAGE)

    async def asset(request: Request) -> FileResponse:
        name, where = request.path_params["name"], _assets_dir()
        if name not in ASSETS:
            return error_response(request, ApiError(404, f"no such path: {request.url.path}"))
        if where is None:
            return error_response(request, ApiError(404, "/docs needs Swagger UI's files: pip install "
                                                         "'llama32[serve]' (swagger-ui-py)"))
        return FileResponse(where / name, headers={"Cache-Control": "max-age=86400"})

    return [Route("/client/v4/accounts/{account_id}/ai/models/schema", model_schema, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/docs", page, methods=["GET"]),
            Route("/docs/{name}", asset, methods=["GET"])]
