"""llama32: a pure-PyTorch reference implementation of Llama 3.2 1B Instruct.

    llm = llama32.load("meta-llama/Llama-3.2-1B-Instruct")
    out = llama32.generate(llm, prompt="What is the capital of France?")

See README.md and docs/API.md (every request field, the result, the server's routes).
"""

from .api import Llama, load
from .chat import render_chat
from .errors import CheckpointError, InvalidRequest
from .generate import generate, generate_batch, score, score_batch, to_sse
from .schemas import schema
from .tool_calls import parse_tool_calls, split_tool_calls

__all__ = [
    "Llama", "load", "generate", "generate_batch", "score", "score_batch", "to_sse", "render_chat", "parse_tool_calls",
    "split_tool_calls", "schema", "InvalidRequest", "CheckpointError",
]
