"""Delivery: each drawn token out to its request's caller, and every other event a job's caller is sent.

Two halves, on two threads:
- on the loop thread, `token` takes each token a request gets, whether a decode step, a prompt's last chunk
  or a speculative verify forward drew it: it records it (the row's next input, the JSON matcher's advance),
  decides what the loop alone can (a stop id, `max_tokens`, a cancelled caller) and retires the row then;
- on the handle's output thread, the text work: the token into the request's `Output` (output.py: detokenizing,
  stop strings, tool calls, log-probability entries, usage) and the chunks onto the job's events. When a stop
  string completes the output, the caller gets its last chunk at once and the row is cancelled (it leaves the
  batch at the loop's next step; a token drawn meanwhile is dropped).
So the loop thread spends no time on text, and a caller's output can not slow the other rows' steps. Every
event for a job (tokens, a scored text's result, its end, an error) goes through the output thread, one
worker taking them in order, so a caller gets them in the order the loop sent them. A failure turning a token
into output fails that request alone (its row is cancelled).
"""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..sampling import first_max
from .job import _END, Job


class Drawn(NamedTuple):
    """A token for the output thread: the id, its log-probability entry (or None), whether it is the row's
    last (a stop id or max_tokens)."""
    token: int
    logprob: tuple[float, list[tuple[int, float]]] | None
    last: bool


class Delivery:
    """The loop's delivery (module docstring). `loop` gives it the handle (`llm`), `retire` and `cancel`."""

    def __init__(self, loop: Any):
        self._loop = weakref.ref(loop)  # the loop owns this
        # One worker: a job's events are handled in the order sent. Its thread ends once the loop is gone.
        self._out = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama32-output")

    @property
    def loop(self) -> Any:
        return self._loop()

    # -- the loop thread ------------------------------------------------------------------------------------

    def step(self, rows: Any, slots: list[int], tokens: Tensor, logprob: Tensor | None,
             top: tuple[Tensor, Tensor] | None, *, first: int = 0) -> None:
        """Each row's new token (row `s` of `slots` reads column `s - first` of the step's outputs)."""
        drawn = tokens.tolist()
        lps = logprob.tolist() if logprob is not None else None
        tops = (top[0].tolist(), top[1].tolist()) if top is not None else None
        for s in slots:
            job = rows.jobs[s]
            try:
                self.token(job, drawn[s - first], lps, tops, s - first)
            except Exception as e:  # noqa: BLE001 - this row's token failed: it alone fails
                self.fail(job, e)

    def token(self, job: Job, token: int, lps: list | None, tops: tuple | None, k: int) -> None:
        """`job`'s new `token` (column `k` of the forward's log-probabilities `lps`, `tops`)."""
        loop = self.loop
        if job.cancelled:
            self.end(job)
            return
        job.progress.token = token
        job.progress.generated.append(token)
        if job.constraint is not None:
            job.constraint.advance(token)
        lp = None
        if job.req.logprobs:
            n = job.req.top_logprobs
            lp = (lps[k], list(zip(tops[0][k][:n], tops[1][k][:n])))
        last = token in loop.llm.stop_ids or job.produced >= job.req.max_tokens
        if last:
            loop.retire(job)
        self._send(job, Drawn(token, lp, last))

    def scored(self, job: Job) -> None:
        """A scored text's result, (log-probabilities, is-greedy[, top ids, top log-probabilities])."""
        llm, scoring = self.loop.llm, job.scoring
        logits = (torch.cat(scoring.logits) if scoring.logits
                  else torch.empty(0, llm.config.vocab_size, device=llm.device))
        targets = torch.tensor(scoring.ids[scoring.n_context:], dtype=torch.long, device=llm.device)
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(-1, targets[:, None])[:, 0]
        result = (chosen.tolist(), (first_max(logits) == targets).tolist())
        if scoring.top:
            values, ids = logp.topk(scoring.top, dim=-1)
            result += (ids.tolist(), values.tolist())
        self.end(job, result)

    def end(self, job: Job, *results: Any) -> None:
        """`job` is done: it leaves its row (if it holds one) and the loop, and its caller is sent `results`, if
        any, then the end."""
        self.loop.retire(job)
        for item in results:
            self._send(job, item)
        self._send(job, _END)

    def fail(self, job: Job, error: BaseException) -> None:
        """`job` failed: it leaves its row (if it holds one) and the loop, and its caller's last event is `error`.
        The one way a job fails, whichever part of the loop found the error."""
        self.loop.retire(job, failed=True)
        self._send(job, error)

    def _send(self, job: Job, item: Any) -> None:
        try:
            self._out.submit(self._handle, job, item)
        except RuntimeError:  # the interpreter is exiting and takes no new work for the thread: handle it here
            self._handle(job, item)

    # -- the output thread ----------------------------------------------------------------------------------

    def _handle(self, job: Job, item: Any) -> None:
        """One event for `job`'s caller; after its last one, the rest are dropped."""
        reply = job.reply
        if reply.answered:
            return
        if not isinstance(item, Drawn):
            reply.put(item)
            return
        try:
            done = job.output.push(item.token, item.last, item.logprob)
            chunks = list(job.output.chunks())
        except Exception as e:  # noqa: BLE001 - this request's output failed: it alone fails
            reply.put(e)
            self._cancel(job)
            return
        if chunks:
            reply.put(chunks)
        if done:
            reply.put(_END)
            if not item.last:  # a stop string: the row is still in the batch
                self._cancel(job)

    def _cancel(self, job: Job) -> None:
        loop = self.loop
        if loop is not None:
            loop.cancel(job)
