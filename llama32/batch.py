"""Offline batch jobs: JSONL of requests in, JSONL of results out, on one machine or on a Ray cluster.

Input lines are `{"id": ..., "request": {<a request body of the contract>}}`; a line without `id` gets its line
number (1-based). Output lines are `{"id", "result"}` or `{"id", "error"}` (the `InvalidRequest` text, or what
was wrong with the line): a bad request never stops the job. Records are written whole, one line each, in
input order, as they finish; a job that was killed is started again with the same OUT and carries on: the ids
already in OUT are skipped (a torn last line, from a kill mid-write, is dropped first), so the final file
equals an uninterrupted run's (but for `usage.cached_tokens`, which counts what earlier requests in the same
process left to reuse).

Without Ray, one handle serves the job: requests go through its generation loop from a pool of threads, so
the loop batches them (continuous batching). With Ray, Ray Data spreads the records over `workers` actors,
each loading the model once (`num_gpus` each on a GPU cluster, CPU actors otherwise), via `map_batches`; the
driver writes the results in input order. From Python: `run(llm, requests)` for a list of request dicts, or
`map_dataset(ds, model)` for a Ray Dataset with a `request` column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InvalidRequest


def read_records(path: str | os.PathLike) -> Iterator[tuple[Any, dict | str]]:
    """(id, request) per input line; (id, error text) for a line that is not a request record."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                yield number, f"line {number}: not valid JSON ({e})"
                continue
            if not isinstance(record, dict):
                yield number, f"line {number}: a record must be an object {{\"id\", \"request\"}}"
                continue
            rid = record.get("id", number)
            request = record.get("request")
            extra = set(record) - {"id", "request"}
            if extra:
                yield rid, f"line {number}: unknown key(s) {sorted(extra)}; a record has id and request"
            elif not isinstance(request, dict):
                yield rid, f"line {number}: request must be an object (a request body), got {type(request).__name__}"
            else:
                yield rid, request


def done_ids(path: str | os.PathLike) -> set[str]:
    """The ids (as JSON text) already written to `path`; a torn last line is cut off the file first."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return {json.dumps(json.loads(line)["id"]) for line in whole.decode("utf-8").splitlines() if line.strip()}


def answer(llm: Any, rid: Any, request: dict | str) -> dict:
    """One output record: the result of `request`, or the error that stopped it."""
    from .generate import generate

    if isinstance(request, str):
        return {"id": rid, "error": request}
    if request.get("stream"):
        return {"id": rid, "error": "stream: batch jobs do not stream; leave it out"}
    try:
        return {"id": rid, "result": generate(llm, **request)}
    except (InvalidRequest, CheckpointError) as e:
        return {"id": rid, "error": str(e)}
    except TypeError as e:  # e.g. a request object whose keys are not strings
        return {"id": rid, "error": f"not a request: {e}"}


def run(llm: Any, requests: Iterable[dict], *, threads: int | None = None) -> list[dict]:
    """Results of many requests on one handle, in order: `{"result": ...}` or `{"error": ...}` each."""
    records = [(i, r) for i, r in enumerate(requests)]
    return [{k: v for k, v in rec.items() if k != "id"} for rec in _answers(llm, records, threads)]


def _answers(llm: Any, records: list[tuple[Any, dict | str]], threads: int | None) -> Iterator[dict]:
    """Output records in input order, as they finish; the handle's loop batches the requests in flight."""
    threads = threads or 2 * llm.loop.max_batch
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llama32-batch") as pool:
        yield from pool.map(lambda rec: answer(llm, *rec), records)


def run_file(src: str | os.PathLike, dst: str | os.PathLike, *, model: str, device: str | None = None,
             dtype: str | None = None, ray_address: str | None = None, use_ray: bool = False, workers: int = 1,
             gpus_per_worker: float = 0, progress: bool = True) -> dict:
    """The whole job: read `src`, skip what `dst` already holds, append the rest to `dst` in input order."""
    skip = done_ids(dst)
    todo = [(rid, req) for rid, req in read_records(src) if json.dumps(rid) not in skip]
    if use_ray:
        records = _ray_answers(todo, model=model, device=device, dtype=dtype, address=ray_address,
                               workers=workers, gpus_per_worker=gpus_per_worker)
    else:
        from .api import load

        llm = load(model, device=device, dtype=dtype)
        records = _answers(llm, todo, None)
    written = errors = 0
    bar = _progress(len(todo), progress)
    with open(dst, "a", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")  # one whole line per record
            out.flush()
            written += 1
            errors += "error" in record
            bar.update(1)
    bar.close()
    return {"skipped": len(skip), "written": written, "errors": errors}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="req", disable=not enabled, desc="llama32 batch")


# ---------------------------------------------------------------------------------------------------------------
# Ray


class RayWorker:
    """A Ray Data actor: loads the model once, then answers batches of records (`id` and `request` columns,
    JSON text) with the same `answer` as a local job."""

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None):
        from .api import load

        self.llm = load(model, device=device, dtype=dtype)

    def __call__(self, batch: dict) -> dict:
        records = [(json.loads(i), json.loads(r)) for i, r in zip(batch["id"], batch["request"])]
        answers = list(_answers(self.llm, records, None))
        return {"index": batch["index"], "record": [json.dumps(a, ensure_ascii=False) for a in answers]}


def map_dataset(ds: Any, model: str, *, workers: int = 1, gpus_per_worker: float = 0, device: str | None = None,
                dtype: str | None = None, batch_size: int = 16) -> Any:
    """A Ray Dataset of records (`id` and `request` columns as JSON text, `index` their order) mapped to one
    with `index` and `record` (the output line's JSON), by `workers` actors of `RayWorker`."""
    options: dict = {"num_gpus": gpus_per_worker} if gpus_per_worker else {"num_cpus": 1}
    return ds.map_batches(RayWorker, fn_constructor_kwargs={"model": model, "device": device, "dtype": dtype},
                          concurrency=workers, batch_size=batch_size, batch_format="numpy", **options)


def _ray_answers(todo: list[tuple[Any, dict | str]], *, model: str, device: str | None, dtype: str | None,
                 address: str | None, workers: int, gpus_per_worker: float) -> Iterator[dict]:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(workers, os.cpu_count() or 1)}))
    try:
        model = str(Path(model).resolve()) if Path(model).is_dir() else model
        rows = [{"index": i, "id": json.dumps(rid), "request": json.dumps(req)} for i, (rid, req) in enumerate(todo)]
        if not rows:
            return
        ds = map_dataset(ray.data.from_items(rows), model, workers=workers, gpus_per_worker=gpus_per_worker,
                         device=device, dtype=dtype)
        # Ray returns batches as they finish; put them back in input order and hand each out once all
        # before it are in, so the output file is written in input order and can be resumed.
        pending: dict[int, dict] = {}
        following = 0
        for row in ds.iter_rows():
            pending[int(row["index"])] = json.loads(row["record"])
            while following in pending:
                yield pending.pop(following)
                following += 1
    finally:
        if started_here:
            ray.shutdown()
