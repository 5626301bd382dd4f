"""OpenAI's response and stream-chunk shapes: chat completions and completions, any number of
choices, logprobs, tool calls."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from flashmesh.coordinator.api.errors import error_body  # noqa: F401 - the body every OpenAI error has
from flashmesh.coordinator.api.jobs import DoneEvent, TokenLogprob
from flashmesh.coordinator.api.tools import Delta, TextSplitter, ToolCall

TokenText = Callable[[int], str]


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(done: list[DoneEvent], *, prompts: list[int]) -> dict:
    """Prompt tokens once per prompt, completion tokens over every choice (OpenAI's count for n > 1)."""
    completion = sum(len(d.stats.tokens) for d in done)
    prompt = sum(prompts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(d.cached_tokens for d in done[: len(prompts)])},
    }


def chat_logprobs(entries: tuple[TokenLogprob, ...], text: TokenText) -> dict:
    def one(token: int, logprob: float) -> dict:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode())}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: tuple[TokenLogprob, ...], text: TokenText, *, offset: int = 0) -> dict:
    tokens = [text(e.token) for e in entries]
    offsets, at = [], offset
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text(t): v for t, v in e.top} for e in entries],
        "text_offset": offsets,
    }


def tool_call_delta(call: ToolCall, index: int) -> dict:
    return {
        "index": index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def message_tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def finish_reason(done: DoneEvent, splitter: TextSplitter | None) -> str | None:
    if splitter is not None and splitter.made_tool_call and done.stats.finish_reason == "stop":
        return "tool_calls"
    return done.stats.finish_reason


class Head:
    """id, object, created, model of one response or its chunks."""

    def __init__(self, *, chat: bool, model: str, run_id: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + run_id
        self.created = int(time.time())

    def __call__(self, *, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def chat_delta(delta: Delta, calls_so_far: int) -> dict:
    out: dict = {}
    if delta.content:
        out["content"] = delta.content
    if delta.reasoning:
        out["reasoning"] = delta.reasoning  # mlx_lm.server's name for the model's thinking
    if delta.tool_calls:
        out["tool_calls"] = [tool_call_delta(c, calls_so_far + i) for i, c in enumerate(delta.tool_calls)]
    return out


def chat_message(delta: Delta) -> dict:
    message: dict = {"role": "assistant", "content": delta.content if delta.content or not delta.tool_calls else None}
    if delta.reasoning:
        message["reasoning"] = delta.reasoning
    if delta.tool_calls:
        message["tool_calls"] = [message_tool_call(c) for c in delta.tool_calls]
    return message


def whole(splitter: TextSplitter, text: str) -> Delta:
    """All of a finished choice's text through its splitter."""
    first, rest = splitter.feed(text), splitter.finish()
    return Delta(first.content + rest.content, first.reasoning + rest.reasoning, first.tool_calls + rest.tool_calls)
