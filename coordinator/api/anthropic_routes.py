"""Anthropic's Messages API: POST /v1/messages (streamed as its server-sent events, tool use) and
/v1/messages/count_tokens, over the same worker as the OpenAI routes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from flashmesh.coordinator.api.anthropic_schemas import CountTokensRequest, MessagesRequest
from flashmesh.coordinator.api.context import ServeContext
from flashmesh.coordinator.api.errors import ApiError, anthropic_error_body
from flashmesh.coordinator.api.jobs import DoneEvent, TextEvent
from flashmesh.coordinator.api.openai_format import whole
from flashmesh.coordinator.api.parsing import parse_body
from flashmesh.coordinator.api.runs import KEEPALIVE_S, CancellingStream, Choice, Run
from flashmesh.coordinator.api.tools import Delta, TextSplitter, ToolCall
from flashmesh.coordinator.generate import SamplingParams

STOP_REASONS = {"eos": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens", "cancelled": "end_turn"}


def event(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, separators=(',', ':'))}\n\n"


def tool_use(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name, "input": call.input}


def prepare(ctx: ServeContext, body: MessagesRequest | CountTokensRequest):
    """(template messages, tools as functions or None, forced-call grammar or None); tokenizer thread."""
    choice = body.tool_choice
    tools = [t.as_function() for t in body.tools or []] if not (choice and choice.type == "none") else []
    named = choice.name if choice is not None and choice.type == "tool" else None
    forced = ctx.forced_tools(tools, required=choice is not None and choice.type == "any", name=named)
    output_format = body.output_config.format if body.output_config else None
    grammar = ctx.output_grammar(
        forced,
        json_output=output_format is not None,
        schema=output_format.schema_ if output_format else None,
        format_param="output_config.format",
    )
    functions = [{"type": "function", "function": t} for t in tools]
    prompt = ctx.encode_chat(body.template_messages(), functions)
    return prompt, tools or None, grammar


def register(app: FastAPI, ctx: ServeContext) -> None:
    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        body = await parse_body(request, CountTokensRequest)
        ctx.check_model(body.model)
        prompt, _, _ = await ctx.off_loop(prepare, ctx, body)
        return {"input_tokens": len(prompt)}

    @app.post("/v1/messages", response_model=None)
    async def messages(request: Request):
        body = await parse_body(request, MessagesRequest)
        ctx.check_model(body.model)
        prompt, tools, grammar = await ctx.off_loop(prepare, ctx, body)
        max_tokens = ctx.max_tokens(len(prompt), body.max_tokens, prompt_param="messages")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p or 1.0,
            top_k=body.top_k or 0,
            stop=tuple(body.stop_sequences or ()),
            seed=body.seed,
            constraint=grammar,
        )
        run = Run(ctx.worker, [Choice(prompt, params)])
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        splitter = TextSplitter(ctx.tokenizer, prompt, tools=tools)
        if body.stream:
            return CancellingStream(_stream(ctx, run, body, message_id, splitter, len(prompt)), run)
        results = await run.collect(request)
        if results is None:
            return {}
        _, done = results[0]
        delta = whole(splitter, done.stats.text)
        content = []
        if delta.reasoning:
            content.append({"type": "thinking", "thinking": delta.reasoning, "signature": ""})
        if delta.content or not delta.tool_calls:
            content.append({"type": "text", "text": delta.content})
        content += [tool_use(c) for c in delta.tool_calls]
        return {
            **_message(ctx, message_id, content),
            **_ending(ctx, body, done, splitter),
            "usage": _usage(done, len(prompt)),
        }


def _message(ctx: ServeContext, message_id: str, content: list) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": ctx.options.model_id, "content": content}


def _ending(ctx: ServeContext, body: MessagesRequest, done: DoneEvent, splitter: TextSplitter) -> dict:
    how, stop = ctx.ended_by(done.stats, list(body.stop_sequences or ()))
    reason = "tool_use" if splitter.made_tool_call and how == "eos" else STOP_REASONS[how]
    return {"stop_reason": reason, "stop_sequence": stop}


def _usage(done: DoneEvent | None, prompt_len: int) -> dict:
    cached = done.cached_tokens if done is not None else 0
    return {
        "input_tokens": prompt_len - cached,
        "output_tokens": len(done.stats.tokens) if done else 0,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


class _Blocks:
    """Anthropic's content blocks as they stream: one open text or thinking block at a time; each
    tool call a whole tool_use block (start, its input as one JSON delta, stop)."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None

    def start(self, kind: str, block: dict) -> list[str]:
        out = self.close()
        self.index += 1
        self.open = kind
        return out + [event("content_block_start", {"index": self.index, "content_block": block})]

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"index": self.index})]

    def feed(self, delta: Delta) -> list[str]:
        out = []
        if delta.reasoning:
            if self.open != "thinking":
                out += self.start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(
                event(
                    "content_block_delta",
                    {"index": self.index, "delta": {"type": "thinking_delta", "thinking": delta.reasoning}},
                )
            )
        if delta.content:
            if self.open != "text":
                out += self.start("text", {"type": "text", "text": ""})
            out.append(
                event(
                    "content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": delta.content}}
                )
            )
        for call in delta.tool_calls:
            block = tool_use(call)
            out += self.start("tool_use", {**block, "input": {}})
            out.append(
                event(
                    "content_block_delta",
                    {"index": self.index, "delta": {"type": "input_json_delta", "partial_json": call.arguments}},
                )
            )
            out += self.close()
        return out


async def _stream(ctx, run: Run, body, message_id: str, splitter: TextSplitter, prompt_len: int) -> AsyncIterator[str]:
    start = {
        **_message(ctx, message_id, []),
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**_usage(None, prompt_len), "output_tokens": 0},
    }
    yield event("message_start", {"message": start})
    yield event("ping", {})
    blocks = _Blocks()
    last_ping = time.monotonic()
    try:
        async for item in run.events(keepalive=KEEPALIVE_S):
            if item is None or time.monotonic() - last_ping > KEEPALIVE_S:
                last_ping = time.monotonic()
                yield event("ping", {})
                if item is None:
                    continue
            _, ev = item
            if isinstance(ev, TextEvent):
                for out in blocks.feed(splitter.feed(ev.text)):
                    yield out
            elif isinstance(ev, DoneEvent):
                for out in blocks.feed(splitter.finish()):
                    yield out
                if blocks.index < 0:  # nothing was generated: still one (empty) text block
                    for out in blocks.start("text", {"type": "text", "text": ""}):
                        yield out
                for out in blocks.close():
                    yield out
                ending = _ending(ctx, body, ev, splitter)
                yield event("message_delta", {"delta": ending, "usage": {"output_tokens": len(ev.stats.tokens)}})
                yield event("message_stop", {})
    except ApiError as e:
        yield event("error", {"error": anthropic_error_body(e.status, str(e))["error"]})
