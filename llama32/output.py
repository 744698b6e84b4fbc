"""One request's output stage: tokens in, response chunks out (text, tool calls, log-probabilities, usage).

The generation loop pushes each row's tokens here; `generate`, streams and `generate_batch` read the chunks.
Text is released as soon as nothing can still change it, and held back while it might:
- a stop string: the longest tail of the text that could still grow into one is held; once one appears,
  the text ends before it and the output is complete;
- a tool call (only when tools were offered): an answer that starts like a call (`{`, `[`,
  `<|python_tag|>`, `<function=`) is held until it turns out to be prose or ends; after prose, everything
  from a `<|python_tag|>` or `<function=` on is held, and so is trailing white space, so that a call at
  the end leaves exactly the prose before it as the response.
So the streamed pieces always concatenate to the non-streamed `response`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .chat import split_tool_calls
from .requests import Request
from .tokenizer import StreamDecoder

# Text that may be the start of a tool call: while the answer could still be one, streaming holds it back.
_CALL_OPENERS = ("{", "[", "<|python_tag|>", "<function=")
# Where a call may start after prose.
_CALL_MARKERS = ("<|python_tag|>", "<function=")


def _partial_suffix(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `needles` (0 if none)."""
    best = 0
    for needle in needles:
        for n in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:n]):
                best = n
                break
    return best


class Output:
    """Turns one row's tokens into response chunks: incremental text, tool calls, usage on the last chunk."""

    def __init__(self, llm: Any, req: Request):
        self.req = req
        self.tokenizer = llm.tokenizer
        self.decoder = StreamDecoder(llm.tokenizer)
        self.stop_ids = llm.stop_ids
        self.text = ""  # all text decoded so far (cut at a stop string once one is found)
        self.released = 0  # self.text[:released] has been handed out in chunks
        # Where held-back tool-call text starts: 0 while the answer may still open with a call.
        self.call_start: int | None = 0 if req.tool_names else None
        self.undecided = bool(req.tool_names)  # the answer's opening could still be a call
        self.entries: list[tuple[int, dict]] = []  # (text offset its token's text ends at, logprob entry)
        self.pending: list[dict] = []
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None  # "stop" (a stop token or string) or "length" (max_tokens), once done

    def push(self, token: int, done: bool, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Take the row's next token (`done`: the loop's last for this row: a stop id or max_tokens).

        `logprob` is the token's (logprob, [(id, logprob) of the most likely alternatives]) when the request
        asked for log-probabilities. Returns True when this output is complete (the loop then retires the
        row and pushes nothing more): `done`, or a stop string appeared.
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
            hits = [i for i in (self.text.find(s, max(self.released - len(s), 0)) for s in self.req.stop) if i >= 0]
            if hits:
                self.text, done, self.finish_reason = self.text[: min(hits)], True, "stop"
        if self.req.logprobs:
            self.entries.append((len(self.text), self._entry(token, logprob)))
        if done:
            self._finish()
        else:
            self._release(self._holdable())
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

    def _holdable(self) -> int:
        """How far the text may be released now."""
        end = len(self.text)
        if self.req.stop:
            end -= _partial_suffix(self.text, self.req.stop)
        if self.call_start is not None and self.undecided:
            head = self.text.lstrip()
            if head and not any(head.startswith(o) or o.startswith(head) for o in _CALL_OPENERS):
                self.undecided, self.call_start = False, None  # prose: release it, and watch what follows
        if self.call_start is None and self.req.tool_names:
            found = [i for i in (self.text.find(m, self.released) for m in _CALL_MARKERS) if i >= 0]
            if found:
                self.call_start = min(found)
        if self.call_start is not None:
            end = min(end, len(self.text[: self.call_start].rstrip()))
        elif self.req.tool_names:  # a marker may be on its way, and the prose before a call ends unpadded
            tail = self.text[: end - _partial_suffix(self.text[:end], _CALL_MARKERS)]
            end = len(tail.rstrip())
        return max(end, self.released)

    def _release(self, upto: int, chunk: dict | None = None) -> None:
        """Hand out text up to offset `upto`, with the logprob entries of the tokens it completes."""
        piece = self.text[self.released: upto]
        entries = [e for end, e in self.entries if end <= upto]
        if not piece and not entries and chunk is None:
            return
        self.entries = [(end, e) for end, e in self.entries if end > upto]
        self.released = max(upto, self.released)
        chunk = {"response": piece, **(chunk or {})}
        if self.req.logprobs:
            chunk["logprobs"] = entries
        if piece or chunk.keys() - {"response", "logprobs"}:
            self.pending.append(chunk)
        elif entries:  # tokens with no text of their own (a stop token): they ride on the next chunk
            self.entries = [(upto, e) for e in entries] + self.entries

    def _finish(self) -> None:
        calls: list[dict] = []
        if self.call_start is not None:
            held = self.text[self.call_start:]
            rest, calls = split_tool_calls(held, self.req.tool_names)
            if calls:
                prose = self.text[self.released: self.call_start].rstrip()
                self.text = self.text[: self.released] + prose + rest
        p = len(self.req.prompt_ids)
        final: dict = {"usage": {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                                 "total_tokens": p + self.completion_tokens}}
        if calls:
            final["tool_calls"] = calls
        self.entries = [(0, e) for _, e in self.entries]  # every entry left goes out with the last chunk
        self._release(len(self.text), final)
