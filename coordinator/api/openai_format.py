"""OpenAI's response and stream-chunk shapes, and its error body."""

from __future__ import annotations

import json
import time

from flashmesh.coordinator.generate import GenerationStats


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(stats: GenerationStats) -> dict:
    completion = len(stats.tokens)
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": stats.prompt_tokens + completion,
    }


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class Reply:
    """Builds the bodies of one completion or chat completion, streamed or not."""

    def __init__(self, *, chat: bool, model: str, job_id: str, token_ids: bool) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self.created = int(time.time())
        self.token_ids = token_ids

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def complete(self, stats: GenerationStats) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": stats.text}}
        else:
            choice = {"index": 0, "text": stats.text}
        choice.update(logprobs=None, finish_reason=stats.finish_reason)
        if self.token_ids:
            choice["token_ids"] = stats.tokens
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": usage(stats)}

    def chunk(self, text: str | None, *, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def final_chunks(self, stats: GenerationStats, *, include_usage: bool) -> list[dict]:
        last = self.chunk(None, finish_reason=stats.finish_reason)
        if self.token_ids:
            last["choices"][0]["token_ids"] = stats.tokens
        chunks = [last]
        if include_usage:  # OpenAI's stream_options.include_usage: one more chunk, no choices
            head = self._head("chat.completion.chunk" if self.chat else "text_completion")
            chunks.append({**head, "choices": [], "usage": usage(stats)})
        return chunks
