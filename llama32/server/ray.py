"""`python -m llama32 serve --replicas N`: the same HTTP app in front of N Ray Serve replicas of the model.

`app(...)` builds a Ray Serve application of three deployments:
- `Engine`, N replicas (or autoscaled): each loads one handle (`llama32.load`), so each has its own generation
  loop, prefix index and adapters. Its methods take one `Call`, whose `prompt` is the request's rendered
  prompt text (chat template, roles and tools applied): the text Ray's prefix router keys on, and the text
  whose tokens the replica's prefix index keys on. Calls without a request (`describe`) take no argument.
- `Ingress`, one replica: `create_app` over a `RayBackend`, as a Serve ASGI ingress behind Serve's HTTP proxy.
  So the routes, envelopes, errors, keys, playground, docs and metrics are the single-process server's, and
  `serve run llama32.server.ray:app model=M replicas=2` serves exactly what `python -m llama32 serve
  --replicas 2` does. (A plain uvicorn process holding a deployment handle would save one hop, about a
  millisecond a request, but `serve run` and Serve's own tooling need the HTTP side to be a deployment.)
- `Replicas`, one replica, no CPU: each engine replica reports its loop stats there (when they change, at
  most every STATS_EVERY s, and at least once a second); `/health` and `/metrics` read them.

Routing: `router="prefix"` (the default with more than one replica) gives the engine deployment Ray Serve's
`PrefixCacheAffinityRouter`: a request whose prompt starts like one routed before goes to the replica that
took that one, while the replicas' queues differ by at most a batch (`max_batch`); `"pow2"` is Serve's default
router (the less busy of two random replicas). A request's `lora` rides on Serve's model multiplexing: the
adapter's name is the multiplexed model id, so the router prefers replicas that already loaded it, and each
replica loads it on first use through `Engine.adapter` (up to CACHED_ADAPTERS per replica, like a handle).

Faults: a request is sent to a replica and its first chunks awaited before the HTTP answer starts; if that
replica dies first, the request goes to another one (ATTEMPTS in all), and so does a non-streamed request
whenever its replica dies. A stream whose replica dies once started ends with an error event (502). Serve
restarts dead replicas. A client that disconnects cancels its request on its replica (the replica's stream
is cancelled, which cancels the job in its loop).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import signal
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.concurrency import run_in_threadpool

import llama32
from llama32.engine import DEFAULT_MAX_BATCH
from llama32.hub import weights_dir
from llama32.lora import CACHED_ADAPTERS
from llama32.requests import check_input, prompt, require_tokenizer

from . import DEFAULT_MAX_BODY, create_app
from .backend import Answer, Backend, Generation, choice_fields
from .errors import ApiError, from_exception

log = logging.getLogger("llama32.server")
APP = "llama32"  # the Serve application's name
STATS_EVERY = 0.25  # seconds between an engine replica's looks at its loop stats
STALE_AFTER = 3.0  # a replica that has not reported for this long is gone from /health and /metrics
ATTEMPTS = 3  # replicas a request is sent to, one after another, while they die before it streams
DEFAULT_ROUTER_IMBALANCE = 2  # prefix routing's --router-imbalance: requests in flight, busiest minus least busy
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
INGRESS_SPARE = 16  # requests the HTTP deployment takes beyond the engines' (health, metrics, docs: `ingress_options`)


@dataclass
class Call:
    """One request for an engine replica. `prompt` is its rendered prompt text, what the prefix router reads."""

    prompt: str
    fields: dict  # the request's fields; the replica validates them again, against its loaded model
    prompt_ids: list[int]  # the prompt's tokens, as the HTTP side counted them
    ids_given: bool = False  # the prompt came as token ids (/v1/completions): they replace the fields' prompt


@dataclass
class Model:
    """What the HTTP side reads of the model (a `Backend.llm`), sent by a replica: no weights."""

    path: str
    tokenizer: Any
    config: Any
    context_length: int


class ReplicaGone(ApiError):
    """The replica generating an answer died after its answer started streaming."""

    def __init__(self):
        super().__init__(502, "the replica generating this answer went away mid-answer (Ray Serve starts a new "
                              "one); send the request again")


QUIET = {"enable_access_log": False}  # Serve's own line per call: reports every second; the app logs requests


@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config=QUIET)
class Replicas:
    """Each engine replica's latest loop stats, as it reported them."""

    def __init__(self):
        self.seen: dict[str, tuple[float, dict]] = {}

    def report(self, stats: dict) -> None:
        self.seen[stats["id"]] = (time.monotonic(), stats)

    def current(self) -> list[dict]:
        now = time.monotonic()
        self.seen = {k: v for k, v in self.seen.items() if now - v[0] < STALE_AFTER}
        return sorted((stats for _, stats in self.seen.values()), key=lambda s: s["id"])


@serve.deployment
class Engine:
    """One replica: one loaded handle and its generation loop, answering `Call`s."""

    async def __init__(self, registry, settings: dict):
        s = settings
        self.llm = await asyncio.to_thread(
            llama32.load, s["model"], device=s["device"], dtype=s["dtype"], lora=s["lora"], max_batch=s["max_batch"],
            quantize=s["quantize"], kv_cache_bytes=s["kv_cache_bytes"], speculative=s["speculative"])
        self.local = Backend(self.llm, model_name=s["served_model_name"], max_queue=s["max_queue"],
                             max_body=DEFAULT_MAX_BODY, lora_dir=s["lora_dir"])
        self.id = serve.get_replica_context().replica_tag
        self.registry = registry
        self._reporting = asyncio.create_task(self._report())

    def stats(self) -> dict:
        return {"id": self.id, **self.llm.loop.stats()}

    async def _report(self) -> None:
        last, when = None, 0.0
        while True:
            stats = self.stats()
            if stats != last or time.monotonic() - when > 1:
                try:
                    await self.registry.report.remote(stats)
                    last, when = stats, time.monotonic()
                except Exception as e:  # noqa: BLE001 - the registry is restarting: report again next time
                    log.debug("could not report stats: %s", e)
            await asyncio.sleep(STATS_EVERY)

    async def describe(self) -> Model:
        llm = self.llm
        return Model(str(llm.path), llm.tokenizer, llm.config, llm.context_length)

    @serve.multiplexed(max_num_models_per_replica=CACHED_ADAPTERS)
    async def adapter(self, name: str) -> dict:
        """`{"lora": its folder}` for the adapter `name` (Serve's model multiplexing counts it as this replica's
        from now on; `validate` loads it, once per replica, after the request's other checks)."""
        return await self.local.adapter({"lora": name})

    async def generate(self, call: Call):
        """This replica's id, then (tokens produced so far, chunks) per loop event. A request refused before it
        starts (its fields, a full queue) is one dict instead: the ApiError's fields, and this replica's id."""
        try:
            fields = call.fields
            if fields.get("lora") is not None:
                fields = dict(fields, **await self.adapter(fields["lora"]))
            [req] = await self.local.validate(fields, 1, call.prompt_ids if call.ids_given else None)  # queue first
        except Exception as e:  # noqa: BLE001 - mapped (and logged, if unexpected) by the one mapping
            err = from_exception(e)
            yield {"status": err.status, "message": err.message, "param": err.param, "headers": err.headers,
                   "replica": self.id}
            return
        gen = Generation(self.llm, req)
        self.llm.loop.submit(gen.job)
        try:
            yield self.id
            async with aclosing(gen.batches()) as batches:
                async for batch in batches:
                    yield gen.produced, batch
        finally:  # the caller left (its client disconnected), maybe before reading a chunk: the job leaves the loop
            if not gen.job.finished:
                self.llm.loop.cancel(gen.job)

    async def score(self, call: Call) -> tuple:
        return await self.local.score(call.prompt_ids, call.fields["top"])

    def __del__(self):  # Serve's graceful shutdown, once the requests in flight have ended
        if hasattr(self, "llm"):
            self.llm.loop.close()


class RemoteGeneration(Answer):
    """One request on an engine replica, read from the replica's stream."""

    def __init__(self, backend: RayBackend, call: Call):
        super().__init__(len(call.prompt_ids), backend.metrics)
        self.call = call
        self.engine = backend.engine.options(stream=True, multiplexed_model_id=call.fields.get("lora") or "")
        self.replica = None
        self.stream = None
        self.pending: list[dict] = []  # the first chunks, read before the answer starts

    async def open(self) -> None:
        """Send the call and wait for its first chunks; if its replica dies first, send it to another."""
        for _ in range(ATTEMPTS):
            self.stream = self.engine.generate.remote(self.call)
            try:
                first = await self.stream.__anext__()
                if isinstance(first, dict):  # refused by the replica
                    self.replica = first["replica"]
                    raise ApiError(first["status"], first["message"], param=first["param"], headers=first["headers"])
                self.replica = first
                self.produced, self.pending = await self.stream.__anext__()
                self.first = time.perf_counter()
                return
            except REPLICA_GONE as e:
                log.warning("a replica went away before answering (%s); sending the request to another replica",
                            type(e).__name__)
            except BackPressureError:
                self.close()
                raise ApiError(503, "every replica is busy; retry shortly", headers={"Retry-After": "1"}) from None
            except BaseException:
                self.close()
                raise
        self.stream = None
        raise ApiError(503, f"{ATTEMPTS} replicas went away before answering; retry shortly",
                       headers={"Retry-After": "1"})

    async def chunks(self):
        try:
            batch, self.pending = self.pending, []
            while True:
                for chunk in batch:
                    if "usage" in chunk:
                        self.last = chunk
                    yield chunk
                try:
                    self.produced, batch = await self.stream.__anext__()
                except StopAsyncIteration:
                    self.stream = None
                    return
                except REPLICA_GONE:
                    log.warning("replica %s went away mid-answer", self.replica)
                    self.stream = None
                    raise ReplicaGone() from None
        finally:
            self.close()
            self._ended()

    async def result(self) -> dict:
        """The whole answer; nothing of it has been sent, so a replica that dies meanwhile only means another
        replica answers it from the start."""
        for attempt in range(ATTEMPTS):
            try:
                return await super().result()
            except ReplicaGone:
                if attempt + 1 == ATTEMPTS:
                    raise
                log.warning("sending the request to another replica")
                self.last = {}
                await self.open()

    def close(self) -> None:
        """Cancel the call on its replica, if it is still running."""
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None


class RayBackend(Backend):
    """The back end over Ray Serve: requests are checked and rendered here, generated on engine replicas."""

    replica = None  # a response no replica worked on names none

    def __init__(self, engine, registry, model: Model, settings: dict):
        super().__init__(model, model_name=settings["served_model_name"], max_queue=settings["max_queue"],
                         max_body=DEFAULT_MAX_BODY, lora_dir=settings["lora_dir"])
        self.engine, self.registry = engine, registry

    async def adapter(self, fields: dict) -> dict:
        self.adapter_dir(fields)  # the name is checked here; each replica loads the adapter (Engine.adapter)
        return fields

    async def validate(self, fields: dict, n: int = 1, prompt_ids: list[int] | None = None) -> list[Call]:
        """One `Call` per choice: the schema's checks and the rendered prompt (on a worker thread: it tokenizes).
        The checks that need the loaded model run on the replica."""
        tok = require_tokenizer(self.llm)

        def one(i: int) -> Call:
            f = choice_fields(fields, i)
            if prompt_ids is not None:
                return Call(tok.decode(prompt_ids), f, list(prompt_ids), ids_given=True)
            text, ids = prompt(tok, check_input(f))
            return Call(text, f, ids)
        return await run_in_threadpool(lambda: [one(i) for i in range(n)])

    async def start(self, request, calls: list[Call]) -> list[Answer]:
        """Send each call to a replica and wait for its first chunks (errors raise here, before any answer)."""
        gens = [RemoteGeneration(self, call) for call in calls]
        request.state.generations = getattr(request.state, "generations", []) + gens
        opening = [asyncio.ensure_future(g.open()) for g in gens]
        try:
            await asyncio.gather(*opening)
        except BaseException:
            for task, g in zip(opening, gens):
                task.cancel()
                g.close()
            raise
        return gens

    async def score(self, prompt_ids: list[int], top: int) -> tuple:
        call = Call(self.llm.tokenizer.decode(prompt_ids), {"top": top}, list(prompt_ids), ids_given=True)
        return await self.engine.score.remote(call)

    async def replicas(self) -> list[dict]:
        return await self.registry.current.remote()


@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config=QUIET)
@serve.ingress()
class Ingress:
    """The HTTP side: `create_app` over a RayBackend, served by Serve's HTTP proxy."""

    async def __init__(self, engine, registry, settings: dict):
        model = await engine.describe.remote()  # waits for the first replica
        self.backend = RayBackend(engine, registry, model, settings)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        s = self.settings
        return create_app(self.backend, api_key=s["api_key"] or os.environ.get("LLAMA32_API_KEY") or None,
                          allowed_origins=s["allowed_origins"])


def settings(options: dict) -> dict:
    """`options` (serve's flags by name, `-` as `_`; values or their text) read by serve's own parser: typed,
    checked, defaults filled in. ValueError names what is wrong."""
    from llama32.__main__ import build_serve_parser

    argv = []
    for key, value in options.items():
        if value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            argv += ["--" + key.replace("_", "-"), *map(str, values)]
    try:
        s = vars(build_serve_parser().parse_args(argv))
    except SystemExit:  # argparse has printed what is wrong
        raise ValueError(f"not options of python -m llama32 serve: {options}") from None
    check(s)
    model = s["model"]
    s["model"] = str(Path(model).resolve()) if Path(model).is_dir() else model  # replicas run elsewhere
    s["served_model_name"] = s["served_model_name"] or model.rstrip("/").split("/")[-1]
    s["lora_dir"] = str(Path(s["lora_dir"] or weights_dir() / "loras").resolve())
    s["replicas"] = s["replicas"] or s["min_replicas"] or 1
    s["cpus_per_replica"] = 1 if s["cpus_per_replica"] is None else s["cpus_per_replica"]
    s["gpus_per_replica"] = s["gpus_per_replica"] or 0
    s["router"] = s["router"] or ("prefix" if max(s["replicas"], s["max_replicas"] or 0) > 1 else "pow2")
    # A replica a couple of requests busier than another gives way: on 2 CPU replicas, a batch (8) let 4 users'
    # first prompts, sent at once, all go to one replica while the other idled (benchmarks/RESULTS.md)
    s["router_imbalance"] = DEFAULT_ROUTER_IMBALANCE if s["router_imbalance"] is None else s["router_imbalance"]
    s["max_batch"] = s["max_batch"] or DEFAULT_MAX_BATCH["cuda" if s["gpus_per_replica"] else "cpu"]
    return s


def check(s: dict) -> None:
    """The Ray flags' values; a ValueError names the flag."""
    for flag, low in (("replicas", 1), ("min_replicas", 0), ("max_replicas", 1), ("cpus_per_replica", 0),
                      ("gpus_per_replica", 0), ("router_imbalance", 0)):
        if s[flag] is not None and s[flag] < low:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {low}, got {s[flag]}")
    low, high = s["min_replicas"], s["max_replicas"]
    if (low is None) != (high is None):
        raise ValueError("--min-replicas and --max-replicas go together (autoscaling between them)")
    if low is not None and low > high:
        raise ValueError(f"--min-replicas ({low}) is more than --max-replicas ({high})")
    if low is not None and s["replicas"] is not None and not low <= s["replicas"] <= high:
        raise ValueError(f"--replicas ({s['replicas']}) is the starting count: it must be within "
                         f"--min-replicas and --max-replicas ({low}..{high})")


def prefix_router() -> type:
    """Ray Serve's PrefixCacheAffinityRouter. Its public module (ray.serve.llm.request_router) imports
    ray.serve.llm, which in Ray 2.60 needs vLLM or SGLang; without them, the class is taken from where it is
    defined."""
    try:
        from ray.serve.llm.request_router import PrefixCacheAffinityRouter
    except ImportError:
        from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import \
            PrefixCacheAffinityRouter
    return PrefixCacheAffinityRouter


def engine_options(s: dict) -> dict:
    """The engine deployment's Serve options: resources, replicas or autoscaling, router, limits."""
    options = {"ray_actor_options": {"num_cpus": s["cpus_per_replica"], "num_gpus": s["gpus_per_replica"]},
               # a replica takes a batch and its queue; more wait in the router, for the next free replica
               "max_ongoing_requests": s["max_batch"] + s["max_queue"],
               "health_check_period_s": 2, "graceful_shutdown_timeout_s": 60}
    if s["min_replicas"] is not None:  # Serve scales on ongoing requests: a full batch each is the target
        options["autoscaling_config"] = {"min_replicas": s["min_replicas"], "max_replicas": s["max_replicas"],
                                         "initial_replicas": s["replicas"], "target_ongoing_requests": s["max_batch"]}
    else:
        options["num_replicas"] = s["replicas"]
    if s["router"] == "prefix":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=prefix_router(), request_router_kwargs={"imbalanced_threshold": s["router_imbalance"]})
    return options


def ingress_options(s: dict) -> dict:
    """The HTTP deployment's Serve options. Serve lets a replica hold 5 requests at once unless told otherwise,
    and a stream holds its slot until its last token: with more streams than that, the rest waited in Serve's
    proxy for whole answers to end before their prompts reached a replica (16 chat users on 2 replicas: time
    to first token 4.5-5.3 s at the client, 0.3 s from the ingress's call to the first token;
    benchmarks/RESULTS.md), and so did `/health`. The ingress only renders prompts and relays chunks, so it takes
    every request the engine replicas can hold or queue (`engine_options`), plus room for health, metrics and
    docs calls; past that, requests wait in the proxy."""
    replicas = max(s["replicas"], s["max_replicas"] or 0)
    return {"max_ongoing_requests": replicas * (s["max_batch"] + s["max_queue"]) + INGRESS_SPARE}


def app(args: dict | None = None, /, **options) -> serve.Application:
    """The application: `app(model=..., replicas=2, router="prefix", ...)` (serve's flags as keywords) for
    `serve.run`, or `app({"model": ..., "replicas": "2"})`, which is how `serve run llama32.server.ray:app
    model=M replicas=2` calls it."""
    s = settings({**(args or {}), **options})
    registry = Replicas.bind()
    engine = Engine.options(**engine_options(s)).bind(registry, s)
    return Ingress.options(**ingress_options(s)).bind(engine, registry, s)


# `serve run` takes a builder only if its signature shows one parameter (the dict of its arguments).
app.__signature__ = inspect.Signature([inspect.Parameter("args", inspect.Parameter.POSITIONAL_ONLY)])


def run(options: dict) -> None:
    """`python -m llama32 serve --replicas N ...`: start a local Ray (or join `--ray ADDRESS`), run the
    application on `--host`/`--port`, and serve until SIGINT or SIGTERM; then drain it (each replica finishes
    its requests in flight) and stop what was started here."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = settings(options)
    local = not s["ray"]
    if local:
        cpus = max(os.cpu_count() or 1, math.ceil(s["replicas"] * s["cpus_per_replica"]))
        context = ray.init(num_cpus=cpus, include_dashboard=False)
    else:
        context = ray.init(address=s["ray"])
    log.info("Ray at %s%s", context.address_info["gcs_address"], " (started here)" if local else "")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": s["host"], "port": s["port"]})
        serve.run(app(s), name=APP, route_prefix="/")
        log.info("serving %s on http://%s:%d: %d replica(s), router %s", s["model"], s["host"], s["port"],
                 s["replicas"], s["router"])
        while not stop.wait(1):
            pass
        log.info("draining")
        serve.delete(APP)
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("shut down")
