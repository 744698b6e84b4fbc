"""A request in the generation loop: what was asked, how far it has got, and (`Reply`) how its caller hears back.

A `Job` is made on the caller's thread (after the request is validated) and submitted to the loop. From then
on the loop thread alone writes its progress; the caller may set `cancelled` (through the loop's `cancel`,
under its lock). Its `reply` is written by the loop's output thread alone (deliver.py) and read by the caller:
chunk lists or a result, then `_END` or an exception.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..output import Output
from ..requests import Request

_END = object()  # a job's last event
_ARRIVAL = itertools.count()  # submission order: pausing takes the latest arrivals first


@dataclass
class Scoring:
    """A text to score (`score`, `score_batch`): all its ids, how many of them are context, how many of the
    most likely alternatives to report, and the log-softmax rows computed so far."""
    ids: list[int]
    n_context: int
    top: int = 0
    logits: list[Tensor] = field(default_factory=list)


class Reply:
    """The caller's side of a job: the events sent to it in order, a hook to wake the caller after each, and
    whether its last event (`_END` or an exception) has gone; anything sent after that is dropped."""

    def __init__(self):
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        # Called after each event: lets an asyncio caller (the server) be woken with call_soon_threadsafe
        # instead of parking a thread on the queue. Must be quick, never raise.
        self.notify: Callable[[], None] | None = None
        self.answered = False

    def put(self, item: Any) -> None:
        """Send the caller an event (chunk list, result, _END or an exception), then `notify` it."""
        if self.answered:
            return
        self.answered = item is _END or isinstance(item, BaseException)
        self.events.put(item)
        if self.notify is not None:
            try:
                self.notify()
            except Exception:  # noqa: BLE001 - a caller's wake-up hook must not take the loop down
                pass

    def results(self) -> Iterator[Any]:
        """The events as they come; raises the error sent, if any."""
        while True:
            item = self.events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class Progress:
    """How far a job has got, kept by the loop thread alone (engine/loop.py and the modules it drives): where its
    keys and values are, what its next decode step feeds, and what it has drawn."""
    context: list[int]  # what its prefill computes: the prompt (or scored text), or a paused row's whole history
    slot: int | None = None  # its row, while it has one
    prefilled: int = 0  # context positions whose keys and values are in the cache (copied or computed)
    resuming: bool = False  # the prefill is a paused row's context: no token is drawn at its end
    decoding: bool = False  # the prompt is done and the first token drawn: the row takes decode steps
    token: int = 0  # the last drawn token, fed to the next step
    pos: int = 0  # where that token goes
    lookahead: int = 0  # positions beyond the next one a step may write (speculation's proposals)
    generated: list[int] = field(default_factory=list)  # the tokens drawn so far (a resumed row recomputes them)


class Job:
    """One request: a generation (`req` and its `Output`) or a scoring forward (`scoring`), how it is drawn
    (`adapter`, `seed`, `constraint`, `spec`), how its caller hears back (`reply`), and how far it has got
    (`progress`, the loop's)."""

    def __init__(self, req: Request | None = None, output: Output | None = None, ids: list[int] | None = None,
                 n_context: int = 0, top: int = 0):
        self.req, self.output = req, output
        self.scoring = Scoring(ids, n_context, top) if req is None else None
        # JSON mode: a matcher of the request's compiled grammar (constrain.py) fills this row's allowed-token
        # mask before each draw (`fill(row)`) and follows each token delivered (`advance(token)`)
        self.constraint: Any = req.grammar.matcher() if req is not None and req.grammar is not None else None
        self.adapter = None  # its LoRA adapter (the request's or the handle's default)
        self.seed = 0  # the request's seed, or a random one: the sampler's noise (counter_noise)
        self.spec: Any = None  # speculative decoding's state for this request (engine/speculative/)
        self.reply = Reply()  # the caller's side (written on the output thread: deliver.py)
        self.cancelled = False
        self.finished = False  # out of the loop (set on the loop thread; its last event may still be on the way)
        self.arrival = next(_ARRIVAL)
        self.progress = Progress(req.prompt_ids if req is not None else ids)

    @property
    def produced(self) -> int:
        return len(self.progress.generated)
