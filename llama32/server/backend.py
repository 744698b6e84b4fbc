"""The back end the routes call, and what they share: the limits, adapter names, requests read from the event loop.

One app, two back ends. `Backend` (here) serves from one in-process handle; `RayBackend` (server/ray.py)
from Ray Serve replicas, each holding its own handle, and subclasses it for what touches a handle. What the
routes and the app use of either: `llm` (the tokenizer, config and context length the routes read), `body`,
`adapter`, `validate`, `start` (and `generate`, `collect`, `stream`, built on those two), `score` (a prompt's
log-probabilities, for echo) and `replicas` (each replica's loop stats, for /health and /metrics). A
started request is an `Answer`: its chunks as they come, and the record that the log and /metrics read.

No thread waits on a request. A route validates its request (on a worker thread, briefly: tokenizing), then
`Backend.start` submits it to the handle's generation loop as a `Job` whose `notify` hook (called by the loop
thread after each event) wakes an asyncio event with `call_soon_threadsafe`; `Generation.chunks` reads the
job's events from there. So hundreds of clients can wait or stream at once on one event loop, and
`max_queue` alone decides when to shed load (503). Leaving `chunks` early (a client that disconnected)
cancels the request, which leaves the batch at the loop's next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from llama32 import lora as lora_mod
from llama32.engine import Job
from llama32.generate import score_ids
from llama32.output import Output
from llama32.requests import validate

from .errors import ApiError, json_body

# One answer for every `lora` that is not an adapter of --lora-dir (a path, `..`, an absolute or unknown name),
# so a client learns nothing about the server's files from it.
UNKNOWN_LORA = "lora: not the name of an adapter this server offers (a folder name in its --lora-dir)"
SEED_RANGE = 9999999999  # seeds are 1..SEED_RANGE (docs/API.md)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready (logged as status 499)."""


def choice_fields(fields: dict, i: int) -> dict:
    """The fields of choice `i` of a request: a seeded request's choice i gets seed + i."""
    if i and isinstance(fields.get("seed"), int):
        return dict(fields, seed=(fields["seed"] - 1 + i) % SEED_RANGE + 1)
    return fields


class Answer:
    """One request being generated, read on the event loop: `chunks` as they come (leaving early cancels the
    request), `result` the whole answer; the other attributes are its record for the log and /metrics."""

    replica = "0"  # the replica generating it (the x-llama32-replica header); one process is replica 0
    produced = 0  # tokens generated for it (also when it was cancelled)

    def __init__(self, prompt_tokens: int, metrics=None):
        self.prompt_tokens, self.metrics = prompt_tokens, metrics
        self.started = time.perf_counter()
        self.first: float | None = None  # when the first text reached us
        self.ended: float | None = None
        self.last: dict = {}  # the last chunk: usage, finish_reason, tool_calls

    @property
    def finish_reason(self) -> str | None:
        return self.last.get("finish_reason")

    def chunks(self) -> AsyncIterator[dict]:
        raise NotImplementedError

    def _ended(self) -> None:
        self.ended = time.perf_counter()
        if self.metrics is not None:
            self.metrics.finished(self)

    async def result(self) -> dict:
        """The whole answer, shaped as `llama32.generate` returns it (every key of the last chunk but its piece)."""
        text, logprobs, any_logprobs = [], [], False
        async for chunk in self.chunks():
            text.append(chunk["response"])
            if "logprobs" in chunk:
                any_logprobs = True
                logprobs.extend(chunk["logprobs"])
        out = {k: v for k, v in self.last.items() if k not in ("response", "logprobs")}
        out = {"response": "".join(text), "tool_calls": out.pop("tool_calls", []), **out}
        if any_logprobs:
            out["logprobs"] = logprobs
        return out


class Generation(Answer):
    """One request in this process's loop (see the module docstring)."""

    def __init__(self, llm, req, metrics=None):
        super().__init__(len(req.prompt_ids), metrics)
        self.llm = llm
        self.job = Job(req, Output(llm, req))
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self.job.reply.notify = self._wake

    def _wake(self) -> None:  # on the loop thread: must not raise
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    @property
    def produced(self) -> int:
        """Tokens the loop has really generated for this request (also when it was cancelled)."""
        return self.job.produced

    @property
    def finish_reason(self) -> str | None:
        return self.last.get("finish_reason") or self.job.output.finish_reason

    async def batches(self) -> AsyncIterator[list[dict]]:
        """The loop's events for this request (each a list of chunks) as they come; leaving early cancels it."""
        events = self.job.reply.results()  # read only when an event is queued, so `next` never blocks
        try:
            while True:
                self._ready.clear()
                if self.job.reply.events.empty():
                    await self._ready.wait()
                    continue
                try:
                    batch = next(events)
                except StopIteration:
                    return
                if self.first is None:
                    self.first = time.perf_counter()
                yield batch
        finally:
            if not self.job.finished:
                self.llm.loop.cancel(self.job)
            self._ended()

    async def chunks(self) -> AsyncIterator[dict]:
        """The response chunks as the loop produces them; leaving early cancels the request."""
        async with aclosing(self.batches()) as batches:  # closed at once when the reader leaves
            async for batch in batches:
                for chunk in batch:
                    if "usage" in chunk:
                        self.last = chunk
                    yield chunk


class Backend:
    """The in-process back end: one handle and the limits every route shares."""

    replica = "0"  # what x-llama32-replica says on a response no generation worked on

    def __init__(self, llm, *, model_name: str, max_queue: int, max_body: int, lora_dir: str | Path,
                 metrics=None):
        self.llm, self.model_name, self.max_queue, self.max_body = llm, model_name, max_queue, max_body
        self.lora_dir = Path(lora_dir)
        self.metrics = metrics

    async def body(self, request: Request) -> dict:
        return await json_body(request, self.max_body)

    def adapter_dir(self, fields: dict) -> Path | None:
        """The folder in `lora_dir` named by `fields`' `lora` (None without one); anything but such a name is
        the one UNKNOWN_LORA 400."""
        name = fields.get("lora")
        if name is None:
            return None
        path = lora_mod.named(self.lora_dir, name)
        if path is None:
            raise ApiError(400, UNKNOWN_LORA, param="lora")
        return path

    async def adapter(self, fields: dict) -> dict:
        """`fields` with its `lora` (an adapter *name*) replaced by that adapter's folder in `lora_dir`. Not
        loaded here: `validate` loads it last, once the queue has room and every other check passed."""
        path = self.adapter_dir(fields)
        return fields if path is None else dict(fields, lora=str(path))

    def admit(self, n: int = 1) -> None:
        """503 when the loop already has `max_queue` requests waiting: shed load rather than queue forever."""
        if self.llm.loop.stats()["waiting"] + n > self.max_queue:
            raise ApiError(503, f"the server is busy ({self.max_queue} requests may wait); retry shortly",
                           headers={"Retry-After": "1"})

    async def validate(self, fields: dict, n: int = 1, prompt_ids: list[int] | None = None) -> list:
        """The library's validation of `fields` (on a worker thread: it tokenizes), once per choice (see
        `choice_fields`). `prompt_ids` replaces the prompt's tokens (a prompt given as ids; checked as a text
        prompt's are, KV budget included). In this order: the queue's room (503), the request's checks (400),
        and last its adapter loaded, so a refused request loads none."""
        self.admit(n)
        name = Path(fields["lora"]).name if fields.get("lora") is not None else None  # adapter() made it a path

        def one(i: int):
            return validate(self.llm, choice_fields(fields, i), prompt_ids=prompt_ids, lora_name=name)
        return await run_in_threadpool(lambda: [one(i) for i in range(n)])

    async def start(self, request: Request, reqs: list) -> list[Answer]:
        """Submit validated requests (all or none: 503 when the queue has no room for them)."""
        self.admit(len(reqs))
        gens = [Generation(self.llm, req, self.metrics) for req in reqs]
        request.state.generations = getattr(request.state, "generations", []) + gens
        for g in gens:
            self.llm.loop.submit(g.job)
        return gens

    async def generate(self, request: Request, fields: dict, n: int = 1) -> list[dict]:
        """Every choice's whole answer; a client that disconnects meanwhile cancels them (ClientGone)."""
        return await self.collect(request, await self.start(request, await self.validate(fields, n)))

    async def collect(self, request: Request, gens: list[Answer]) -> list[dict]:
        """Each generation's whole answer, in order; a client that disconnects meanwhile cancels them."""
        return await until_disconnected(request, asyncio.gather(*(g.result() for g in gens)))

    async def stream(self, request: Request, fields: dict, n: int = 1) -> list[Answer]:
        """Validated and submitted (errors raise here, before any response starts); read each one's chunks."""
        return await self.start(request, await self.validate(fields, n))

    async def score(self, prompt_ids: list[int], top: int) -> tuple:
        """`score_ids` of the prompt after its first token: (logprobs, is_greedy, top ids, top logprobs)."""
        return await run_in_threadpool(score_ids, self.llm, prompt_ids, 1, top)

    async def replicas(self) -> list[dict]:
        """Each replica's loop stats (`GenerationLoop.stats`) with its `id`; here the one loop, replica 0."""
        return [{"id": "0", **self.llm.loop.stats()}]


async def until_disconnected(request: Request, work: asyncio.Future):
    """`await work`, unless the client disconnects first: then `work` is cancelled and ClientGone raised."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work not in done:
        work.cancel()
        try:
            await work
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; only the cleanup matters
            pass
        raise ClientGone()
    return work.result()


async def merged(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict | None]]:
    """(index, chunk) from several chunk iterators as each comes (n choices streamed together), and
    (index, None) when iterator `index` has ended."""
    if len(streams) == 1:
        async for c in streams[0]:
            yield 0, c
        yield 0, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for c in s:
                await queue.put((i, c))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, c = await queue.get()
            if isinstance(c, BaseException):
                raise c
            left -= c is None
            yield i, c
    finally:
        for t in tasks:
            t.cancel()
