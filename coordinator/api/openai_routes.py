"""POST /v1/completions and /v1/chat/completions: validate, tokenize off the loop, run the
choices (n per prompt), format OpenAI's bodies or chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from flashmesh.coordinator.api import openai_format as fmt
from flashmesh.coordinator.api.context import MAX_CHOICES, ServeContext
from flashmesh.coordinator.api.errors import ApiError, error_body, unsupported
from flashmesh.coordinator.api.jobs import DoneEvent, TextEvent
from flashmesh.coordinator.api.parsing import parse_body
from flashmesh.coordinator.api.runs import KEEPALIVE_S, CancellingStream, Choice, Run
from flashmesh.coordinator.api.schemas import ChatCompletionRequest, CompletionRequest, Sampling
from flashmesh.coordinator.api.tools import TextSplitter
from flashmesh.coordinator.generate import Constraint, SamplingParams


def sampling(ctx: ServeContext, body: Sampling, max_tokens: int, *, choice: int, constraint=None) -> SamplingParams:
    """Choice `choice` of n: with a seed, each choice gets its own (seed + choice), reproducibly."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        stop=tuple(body.stops),
        seed=None if body.seed is None else body.seed + choice,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=ctx.check_logit_bias(body.logit_bias),
        constraint=constraint,
    )


def check_choices(ctx: ServeContext, count: int) -> None:
    most = min(MAX_CHOICES, ctx.worker.max_queue)
    if count > most:
        raise ApiError(400, f"{count} choices (n x prompts); at most {most} per request here", param="n")


def chat_constraint(ctx: ServeContext, body: ChatCompletionRequest) -> tuple[list[dict] | None, Constraint | None]:
    """(the tools to offer the template and parse calls for, the grammar the output must match)."""
    choice = body.tool_choice
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools or []] if choice != "none" else []
    named = None if isinstance(choice, str | None) else choice.function.name
    forced = ctx.forced_tools(tools, required=choice == "required", name=named)
    response_format = body.response_format
    json_output = response_format is not None and response_format.type != "text"
    schema = None
    if json_output and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise ApiError(400, "response_format json_schema needs its json_schema", param="response_format")
        schema = response_format.json_schema.schema_ or {}
    grammar = ctx.output_grammar(forced, json_output=json_output, schema=schema, format_param="response_format")
    return tools or None, grammar


def _choices(head, results: dict, body: Sampling, *, prompts: list[int], build) -> dict:
    """The non-streamed body: one choice per result, `build(index, done)` its fields."""
    ordered = sorted(results.items())
    out = []
    for i, (_, done) in ordered:
        choice = {"index": i, **build(i, done)}
        if body.return_token_ids:
            choice["token_ids"] = done.stats.tokens
        out.append(choice)
    return {**head(chunk=False), "choices": out, "usage": fmt.usage([d for _, (_, d) in ordered], prompts=prompts)}


def register(app: FastAPI, ctx: ServeContext) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        ctx.check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise unsupported("logprobs", "together with echo (the prompt's logprobs are not computed)")
        check_choices(ctx, len(body.prompts) * body.n)
        prompts = [await ctx.off_loop(ctx.encode_text, p) for p in body.prompts]
        # OpenAI's default for completions is 16 tokens (chat: as many as fit).
        requested = body.max_tokens if body.max_tokens is not None else min(16, ctx.options.max_tokens_limit)
        choices = [
            Choice(p, sampling(ctx, body, ctx.max_tokens(len(p), requested), choice=j), body.logprobs)
            for p in prompts
            for j in range(body.n)
        ]
        echoes = [ctx.tokenizer.decode(p) if body.echo else "" for p in prompts for _ in range(body.n)]
        run = Run(ctx.worker, choices)
        head = fmt.Head(chat=False, model=ctx.options.model_id, run_id=run.id)
        lengths = [len(p) for p in prompts]
        if body.stream:
            return CancellingStream(_stream_completion(ctx, run, head, body, echoes, lengths), run)
        results = await run.collect(request)
        if results is None:
            return {}

        def build(i: int, done: DoneEvent) -> dict:
            lp = None if body.logprobs is None else fmt.completion_logprobs(done.logprobs, ctx.token_text)
            return {"text": echoes[i] + done.stats.text, "finish_reason": done.stats.finish_reason, "logprobs": lp}

        return _choices(head, results, body, prompts=lengths, build=build)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        ctx.check_model(body.model)
        check_choices(ctx, body.n)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools, constraint = await ctx.off_loop(chat_constraint, ctx, body)
        messages = [m.for_template() for m in body.messages]
        prompt = await ctx.off_loop(
            ctx.encode_chat, messages, [{"type": "function", "function": t} for t in tools or []]
        )
        max_tokens = ctx.max_tokens(len(prompt), body.token_limit, param="max_tokens", prompt_param="messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        run = Run(
            ctx.worker,
            [
                Choice(prompt, sampling(ctx, body, max_tokens, choice=j, constraint=constraint), logprobs)
                for j in range(body.n)
            ],
        )
        head = fmt.Head(chat=True, model=ctx.options.model_id, run_id=run.id)
        splitters = [TextSplitter(ctx.tokenizer, prompt, tools=tools) for _ in range(body.n)]
        if body.stream:
            return CancellingStream(_stream_chat(ctx, run, head, body, splitters, len(prompt)), run)
        results = await run.collect(request)
        if results is None:
            return {}

        def build(i: int, done: DoneEvent) -> dict:
            lp = None if logprobs is None else fmt.chat_logprobs(done.logprobs, ctx.token_text)
            message = fmt.chat_message(fmt.whole(splitters[i], done.stats.text))
            return {"message": message, "logprobs": lp, "finish_reason": fmt.finish_reason(done, splitters[i])}

        return _choices(head, results, body, prompts=[len(prompt)], build=build)


async def _stream_completion(ctx, run: Run, head, body: CompletionRequest, echoes, lengths) -> AsyncIterator[str]:
    def chunk(i: int, text: str, *, logprobs=None, finish=None) -> dict:
        return {
            **head(chunk=True),
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }

    sent_text = [len(e) for e in echoes]
    done: dict[int, DoneEvent] = {}
    for i, echo in enumerate(echoes):
        if echo:
            yield fmt.sse(chunk(i, echo))
    async for item in _safely(run):
        if isinstance(item, str):
            yield item
            continue
        i, event = item
        if isinstance(event, TextEvent):
            lp = (
                None
                if body.logprobs is None
                else fmt.completion_logprobs(event.logprobs, ctx.token_text, offset=sent_text[i])
            )
            sent_text[i] += len(event.text)
            yield fmt.sse(chunk(i, event.text, logprobs=lp))
        elif isinstance(event, DoneEvent):
            done[i] = event
            last = chunk(i, "", finish=event.stats.finish_reason)
            if body.return_token_ids:
                last["choices"][0]["token_ids"] = event.stats.tokens
            yield fmt.sse(last)
    if len(done) == len(run.jobs) and body.include_usage:
        yield fmt.sse(
            {**head(chunk=True), "choices": [], "usage": fmt.usage([done[i] for i in sorted(done)], prompts=lengths)}
        )
    yield fmt.sse("[DONE]")


async def _stream_chat(
    ctx, run: Run, head, body: ChatCompletionRequest, splitters, prompt_len: int
) -> AsyncIterator[str]:
    def chunk(i: int, delta: dict, *, logprobs=None, finish=None) -> dict:
        return {
            **head(chunk=True),
            "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    want_logprobs = bool(body.logprobs)
    calls = [0] * len(splitters)
    sent = [0] * len(splitters)
    done: dict[int, DoneEvent] = {}
    for i in range(len(splitters)):
        yield fmt.sse(chunk(i, {"role": "assistant", "content": ""}))
    async for item in _safely(run):
        if isinstance(item, str):
            yield item
            continue
        i, event = item
        if isinstance(event, TextEvent):
            delta, logprobs = splitters[i].feed(event.text), event.logprobs
        elif isinstance(event, DoneEvent):
            delta, logprobs = splitters[i].finish(), event.logprobs[sent[i] :]
        else:
            continue
        sent[i] += len(logprobs) if isinstance(event, TextEvent) else 0
        if delta or (want_logprobs and logprobs):
            lp = fmt.chat_logprobs(tuple(logprobs), ctx.token_text) if want_logprobs else None
            yield fmt.sse(chunk(i, fmt.chat_delta(delta, calls[i]), logprobs=lp))
            calls[i] += len(delta.tool_calls)
        if isinstance(event, DoneEvent):
            done[i] = event
            last = chunk(i, {}, finish=fmt.finish_reason(event, splitters[i]))
            if body.return_token_ids:
                last["choices"][0]["token_ids"] = event.stats.tokens
            yield fmt.sse(last)
    if len(done) == len(run.jobs) and body.include_usage:
        ordered = [done[i] for i in sorted(done)]
        yield fmt.sse({**head(chunk=True), "choices": [], "usage": fmt.usage(ordered, prompts=[prompt_len])})
    yield fmt.sse("[DONE]")


async def _safely(run: Run) -> AsyncIterator:
    """The run's events, SSE keep-alive comments while it waits, and an error as OpenAI's error event."""
    try:
        async for item in run.events(keepalive=KEEPALIVE_S):
            yield ": keep-alive\n\n" if item is None else item
    except ApiError as e:
        yield fmt.sse(error_body(str(e), kind=e.kind, code=e.code))
