"""One request's output stage: tokens in, response chunks out (text, tool calls, log-probabilities, usage).

The handle's output thread (engine/deliver.py) pushes each row's tokens here; `generate`, streams and
`generate_batch` read the chunks.
The last chunk carries `usage` (with `cached_tokens`: prompt tokens whose keys and values were reused),
`finish_reason` ("stop", "length" or "tool_calls") and any `tool_calls`.
Text is released as soon as nothing can still change it, and held back while it might:
- a stop string: the longest tail of the text that could still grow into one is held; once one appears,
  the text ends before it and the output is complete;
- a tool call (only when tools were offered): `llama32.tool_calls.Scanner` reads the text as it grows, the
  same reader `split_tool_calls` uses; prose it has decided is released, and from the first place where a
  call to an offered tool may be starting (`{`, `[`, `<|python_tag|>`, `<function=`, or a bare `f(` at the
  answer's start) everything is held until that turns out to be a call (dropped from the text, listed in
  `tool_calls`) or not (released as text). Trailing white space is held too, since the response ends
  unpadded when calls were found.
So the streamed pieces always concatenate to the non-streamed `response`, and never show a call that the
last chunk lists in `tool_calls`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from .requests import Request
from .tokenizer import StreamDecoder
from .tool_calls import Scanner


def _partial_suffix(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `needles` (0 if none).

    Called on every token of a request with stop strings, so linear in each needle's length (issue 34: it
    tried every prefix of every needle, each an O(n) slice and comparison, O(len(stop)^2) per token): the
    KMP automaton of the needle run over the last len(needle) - 1 characters of `text` (a longer tail cannot
    be a proper prefix) ends in the state that is the longest such prefix."""
    best = 0
    for needle in needles:
        m = len(needle)
        if m - 1 <= best:  # none of its proper prefixes is longer than what was found
            continue
        fail, k = _failure(needle), 0
        for ch in text[max(len(text) - (m - 1), 0):]:
            while k and ch != needle[k]:
                k = fail[k - 1]
            if ch == needle[k]:
                k += 1  # at most len(tail) <= m - 1: never a whole needle, so needle[k] stays in range
        best = max(best, k)
    return best


@lru_cache(maxsize=64)
def _failure(needle: str) -> tuple[int, ...]:
    """KMP's failure function: [i] is the length of the longest proper prefix of needle[:i + 1] that is also
    its suffix. Cached: a request's stop strings are the same on each of its tokens."""
    fail, k = [0] * len(needle), 0
    for i in range(1, len(needle)):
        while k and needle[i] != needle[k]:
            k = fail[k - 1]
        if needle[i] == needle[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


class Output:
    """Turns one row's tokens into response chunks: incremental text, tool calls, usage on the last chunk."""

    def __init__(self, llm: Any, req: Request):
        self.req = req
        self.tokenizer = llm.tokenizer
        self.decoder = StreamDecoder(llm.tokenizer)
        self.stop_ids = llm.stop_ids
        self.text = ""  # all text decoded so far (cut at a stop string once one is found)
        self.searched = 0  # stop strings were looked for in self.text[:searched]
        # The response: the text itself, or with tools offered the text outside the calls (the scanner's).
        self.scanner = Scanner(req.tool_names) if req.tool_names else None
        self.released = 0  # the response's first `released` characters have been handed out in chunks
        self.entries: list[tuple[int, dict]] = []  # (text offset its token's text ends at, logprob entry)
        self.pending: list[dict] = []
        self.completion_tokens = 0
        self.finished = False
        # once done: "stop" (a stop token or string), "length" (max_tokens) or "tool_calls" (calls were found)
        self.finish_reason: str | None = None
        self.cached_tokens = 0  # prompt tokens not computed (their keys and values reused); set by the loop

    def push(self, token: int, done: bool, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Take the row's next token (`done`: the loop's last for this row: a stop id or max_tokens).

        `logprob` is the token's (logprob, [(id, logprob) of the most likely alternatives]) when the request
        asked for log-probabilities. Returns True when this output is complete (nothing more is pushed; on a
        stop string the row is cancelled): `done`, or a stop string appeared.
        """
        assert not self.finished, "push after the output was complete"
        self.completion_tokens += 1
        piece = "" if token in self.stop_ids else self.decoder.push(token)
        if done:
            piece += self.decoder.flush()
        self.text += piece
        if done:
            self.finish_reason = "stop" if token in self.stop_ids else "length"
        if self.req.stop:
            hits = [i for i in (self.text.find(s, max(self.searched - len(s) + 1, 0)) for s in self.req.stop)
                    if i >= 0]
            self.searched = len(self.text)
            if hits:
                self.text, done, self.finish_reason = self.text[: min(hits)], True, "stop"
        if self.req.logprobs:
            self.entries.append((len(self.text), self._entry(token, logprob)))
        if done:
            self._finish()
        else:
            self._release(*self._releasable())
        self.finished = done
        return done

    def chunks(self) -> Iterator[dict]:
        while self.pending:
            yield self.pending.pop(0)

    # -- internals ------------------------------------------------------------------------------------------

    def _entry(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None) -> dict:
        assert logprob is not None, "the loop must pass log-probabilities for a request that asks for them"
        value, top = logprob
        decode = self.tokenizer.decode
        return {"token": decode([token]), "id": token, "logprob": value,
                "top_logprobs": [{"token": decode([i]), "id": i, "logprob": lp} for i, lp in top]}

    def _releasable(self) -> tuple[str, int]:
        """The response as far as it may be released now, and where in the text that part ends."""
        end = len(self.text)
        if self.req.stop:
            end -= _partial_suffix(self.text, self.req.stop)
        if self.scanner is None:
            return self.text[:end], end
        self.scanner.feed(self.text[:end])
        out = self.scanner.settled()  # the response ends unpadded before a call
        return out, self.scanner.source_offset(len(out))

    def _release(self, response: str, upto: int, chunk: dict | None = None) -> None:
        """Hand out `response` past what was released, with the logprob entries of the tokens whose text
        ends before `upto` in self.text."""
        piece = response[self.released:]
        entries = [e for end, e in self.entries if end <= upto]
        if not piece and not entries and chunk is None:
            return
        self.entries = [(end, e) for end, e in self.entries if end > upto]
        self.released = max(len(response), self.released)
        chunk = {"response": piece, **(chunk or {})}
        if self.req.logprobs:
            chunk["logprobs"] = entries
        if piece or chunk.keys() - {"response", "logprobs"}:
            self.pending.append(chunk)
        elif entries:  # tokens with no text of their own (a stop token): they ride on the next chunk
            self.entries = [(upto, e) for e in entries] + self.entries

    def _finish(self) -> None:
        calls: list[dict] = []
        response = self.text
        if self.scanner is not None:
            self.scanner.feed(self.text, final=True)
            calls = self.scanner.calls
            response = self.scanner.remaining()
        p = len(self.req.prompt_ids)
        if calls:
            self.finish_reason = "tool_calls"
        final: dict = {"usage": {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                                 "total_tokens": p + self.completion_tokens, "cached_tokens": self.cached_tokens},
                       "finish_reason": self.finish_reason}
        if calls:
            final["tool_calls"] = calls
        self.entries = [(0, e) for _, e in self.entries]  # every entry left goes out with the last chunk
        self._release(response, len(self.text), final)
