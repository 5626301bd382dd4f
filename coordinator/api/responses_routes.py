"""OpenAI's Responses API: POST /v1/responses (streamed as its typed events), text, JSON output
and function calls, over the same worker as the chat completions."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from flashmesh.coordinator.api.context import ServeContext
from flashmesh.coordinator.api.errors import ApiError
from flashmesh.coordinator.api.jobs import DoneEvent, TextEvent
from flashmesh.coordinator.api.openai_format import whole
from flashmesh.coordinator.api.parsing import parse_body
from flashmesh.coordinator.api.responses_schemas import ResponsesRequest
from flashmesh.coordinator.api.runs import KEEPALIVE_S, CancellingStream, Choice, Run
from flashmesh.coordinator.api.tools import Delta, TextSplitter, ToolCall
from flashmesh.coordinator.generate import SamplingParams


def prepare(ctx: ServeContext, body: ResponsesRequest):
    """(prompt, tools offered or None, grammar or None); on the tokenizer thread."""
    choice = body.tool_choice
    tools = [t.as_function() for t in body.tools or []] if choice != "none" else []
    named = None if isinstance(choice, str | None) else choice.name
    forced = ctx.forced_tools(tools, required=choice == "required", name=named)
    text_format = body.text.format if body.text else None
    json_output = text_format is not None and text_format.type != "text"
    schema = (text_format.schema_ or {}) if json_output and text_format.type == "json_schema" else None
    grammar = ctx.output_grammar(forced, json_output=json_output, schema=schema, format_param="text.format")
    prompt = ctx.encode_chat(
        body.template_messages(), [{"type": "function", "function": t} for t in tools], param="input"
    )
    return prompt, tools or None, grammar


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def message_item(item_id: str, text: str, *, status: str = "completed") -> dict:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(call: ToolCall, *, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": _item_id("fc"),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


def register(app: FastAPI, ctx: ServeContext) -> None:
    @app.post("/v1/responses", response_model=None)
    async def responses(request: Request):
        body = await parse_body(request, ResponsesRequest)
        ctx.check_model(body.model)
        prompt, tools, grammar = await ctx.off_loop(prepare, ctx, body)
        max_tokens = ctx.max_tokens(
            len(prompt), body.max_output_tokens, param="max_output_tokens", prompt_param="input"
        )
        params = SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, constraint=grammar
        )
        run = Run(ctx.worker, [Choice(prompt, params)])
        shell = _Shell(ctx, body, f"resp_{run.id}", len(prompt))
        splitter = TextSplitter(ctx.tokenizer, prompt, tools=tools)
        if body.stream:
            return CancellingStream(_stream(run, shell, splitter), run)
        results = await run.collect(request)
        if results is None:
            return {}
        _, done = results[0]
        delta = whole(splitter, done.stats.text)
        output = [call_item(c) for c in delta.tool_calls]
        if delta.content or not output:
            output.insert(0, message_item(_item_id("msg"), delta.content))
        return shell.response(output, done)


class _Shell:
    """The response object around the output, as created, in progress and finished."""

    def __init__(self, ctx: ServeContext, body: ResponsesRequest, response_id: str, prompt_len: int) -> None:
        self.ctx, self.body, self.id, self.prompt_len = ctx, body, response_id, prompt_len
        self.created = int(time.time())

    def response(self, output: list[dict], done: DoneEvent | None) -> dict:
        body = self.body
        status, incomplete = "in_progress", None
        if done is not None:
            status = "incomplete" if done.stats.finish_reason == "length" else "completed"
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        tool_choice = body.tool_choice or "auto"
        out = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.instructions,
            "model": self.ctx.options.model_id,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_output_tokens": body.max_output_tokens,
            "previous_response_id": None,
            "store": False,
            "truncation": "disabled",
            "metadata": body.metadata or {},
            "text": {
                "format": (
                    body.text.format.model_dump(by_alias=True, exclude_none=True)
                    if body.text and body.text.format
                    else {"type": "text"}
                )
            },
            "user": body.user,
            "usage": None,
        }
        if done is not None:
            generated = len(done.stats.tokens)
            out["usage"] = {
                "input_tokens": self.prompt_len,
                "input_tokens_details": {"cached_tokens": done.cached_tokens},
                "output_tokens": generated,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_len + generated,
            }
        return out


async def _stream(run: Run, shell: _Shell, splitter: TextSplitter) -> AsyncIterator[str]:
    sequence = 0

    def emit(kind: str, payload: dict) -> str:
        nonlocal sequence
        sequence += 1
        data = json.dumps({"type": kind, "sequence_number": sequence - 1, **payload}, separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n"

    output: list[dict] = []
    text_item: dict | None = None  # the open message item, while text streams into it
    text = ""
    yield emit("response.created", {"response": shell.response([], None)})
    yield emit("response.in_progress", {"response": shell.response([], None)})

    def feed(delta: Delta) -> list[str]:
        nonlocal text_item, text
        out = []
        if delta.content:
            if text_item is None:
                text_item = message_item(_item_id("msg"), "", status="in_progress")
                output.append(text_item)
                out.append(emit("response.output_item.added", {"output_index": len(output) - 1, "item": text_item}))
                out.append(
                    emit(
                        "response.content_part.added",
                        {
                            "item_id": text_item["id"],
                            "output_index": len(output) - 1,
                            "content_index": 0,
                            "part": {"type": "output_text", "text": "", "annotations": []},
                        },
                    )
                )
            text += delta.content
            out.append(
                emit(
                    "response.output_text.delta",
                    {
                        "item_id": text_item["id"],
                        "output_index": len(output) - 1,
                        "content_index": 0,
                        "delta": delta.content,
                        "logprobs": [],
                    },
                )
            )
        for call in delta.tool_calls:
            out += close_text()
            item = call_item(call)
            output.append(item)
            index = len(output) - 1
            out.append(
                emit(
                    "response.output_item.added",
                    {"output_index": index, "item": {**item, "arguments": "", "status": "in_progress"}},
                )
            )
            out.append(
                emit(
                    "response.function_call_arguments.delta",
                    {"item_id": item["id"], "output_index": index, "delta": call.arguments},
                )
            )
            out.append(
                emit(
                    "response.function_call_arguments.done",
                    {"item_id": item["id"], "output_index": index, "name": call.name, "arguments": call.arguments},
                )
            )
            out.append(emit("response.output_item.done", {"output_index": index, "item": item}))
        return out

    def close_text() -> list[str]:
        nonlocal text_item, text
        if text_item is None:
            return []
        index = output.index(text_item)
        done = message_item(text_item["id"], text)
        output[index] = done
        part = done["content"][0]
        out = [
            emit(
                "response.output_text.done",
                {"item_id": done["id"], "output_index": index, "content_index": 0, "text": text, "logprobs": []},
            ),
            emit(
                "response.content_part.done",
                {"item_id": done["id"], "output_index": index, "content_index": 0, "part": part},
            ),
            emit("response.output_item.done", {"output_index": index, "item": done}),
        ]
        text_item, text = None, ""
        return out

    try:
        async for item in run.events(keepalive=KEEPALIVE_S):
            if item is None:
                yield ": keep-alive\n\n"
                continue
            _, ev = item
            if isinstance(ev, TextEvent):
                for out in feed(splitter.feed(ev.text)):
                    yield out
            elif isinstance(ev, DoneEvent):
                for out in feed(splitter.finish()) + close_text():
                    yield out
                final = shell.response(output, ev)
                yield emit(
                    "response.incomplete" if final["status"] == "incomplete" else "response.completed",
                    {"response": final},
                )
    except ApiError as e:
        yield emit("error", {"code": e.code, "message": str(e), "param": e.param})
