"""One request's output stage: tokens in, response chunks out (incremental text, tool calls, usage).

The generation loop pushes each row's tokens here; `generate`, streams and `generate_batch` read the chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .chat import split_tool_calls
from .requests import Request
from .tokenizer import StreamDecoder

# Text that may be the start of a tool call: while the answer could still be one, streaming holds it back.
_CALL_OPENERS = ("{", "[", "<|python_tag|>", "<function=")


class Output:
    """Turns one row's tokens into response chunks: incremental text, tool calls, usage on the last chunk.

    When tools were offered, text that might still become a tool call is held back until it is either
    clearly prose (then released) or finished (then parsed), so the streamed pieces always concatenate to
    the non-streamed `response`.
    """

    def __init__(self, llm: Any, req: Request):
        self.req = req
        self.decoder = StreamDecoder(llm.tokenizer)
        self.stop_ids = llm.stop_ids
        self.holding = bool(req.tool_names)
        self.held = ""
        self.pending: list[dict] = []
        self.completion_tokens = 0

    def push(self, token: int, done: bool, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Take the row's next token (`done`: the loop's last for this row). `logprob` is the token's
        (logprob, [(id, logprob) of the top alternatives]) when the request asked for log-probabilities.
        Returns True when this output is complete (the loop then retires the row)."""
        self.completion_tokens += 1
        piece = "" if token in self.stop_ids else self.decoder.push(token)
        if done:
            piece += self.decoder.flush()
        if self.holding:
            self.held += piece
            head = self.held.lstrip()
            if head and not any(head.startswith(o) or o.startswith(head) for o in _CALL_OPENERS):
                piece, self.held, self.holding = self.held, "", False
            else:
                piece = ""
        if piece:
            self.pending.append({"response": piece})
        if done:
            calls: list[dict] = []
            if self.held:
                rest, calls = split_tool_calls(self.held, self.req.tool_names)
                self.held = ""
                if rest:
                    self.pending.append({"response": rest})
            p = len(self.req.prompt_ids)
            final = {"response": "", "usage": {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                                                "total_tokens": p + self.completion_tokens}}
            if calls:
                final["tool_calls"] = calls
            if self.pending:  # the last piece of text rides on the final chunk
                final["response"] = self.pending.pop()["response"]
            self.pending.append(final)
        return done

    def chunks(self) -> Iterator[dict]:
        while self.pending:
            yield self.pending.pop(0)
