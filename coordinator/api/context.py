"""What every API's handlers share: the served model's id, tokenizer and limits, prompt encoding
(on the tokenizer thread, never on the event loop's), token budgets, and the grammars that
enforce JSON output and forced tool calls."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from flashmesh.coordinator.api.constrained import Grammar, GrammarError, Grammars
from flashmesh.coordinator.api.errors import ApiError, unsupported
from flashmesh.coordinator.api.worker import GenerationWorker

MAX_CHOICES = 16  # n x prompts in one request


@dataclass(frozen=True)
class ServeOptions:
    model_id: str
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_body_bytes: int = 8 * 2**20
    context_length: int | None = None  # prompt + completion tokens; default: the model's config


class ServeContext:
    def __init__(self, worker: GenerationWorker, options: ServeOptions) -> None:
        self.worker, self.options = worker, options
        self.tokenizer = worker.tokenizer
        config = worker.manifest.config
        self.vocab_size = int(config.get("vocab_size") or len(self.tokenizer.get_vocab()))
        self.context = options.context_length or int(config.get("max_position_embeddings") or 4096)
        self.grammars = Grammars(self.tokenizer, self.vocab_size)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmesh-tokenizer")
        self.token_text = lru_cache(maxsize=65536)(lambda t: self.tokenizer.decode([t]))

    def check_model(self, name: str) -> None:
        if name != self.options.model_id:
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server has {self.options.model_id!r}",
                param="model",
                code="model_not_found",
            )

    async def off_loop(self, fn, *args):
        """Run `fn` on the tokenizer thread (tokenizing and compiling grammars take milliseconds)."""
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    def max_tokens(
        self, prompt_len: int, requested: int | None, *, param: str = "max_tokens", prompt_param: str = "prompt"
    ) -> int:
        """The generation's token budget: `requested`, or as many as fit; 400 past the context or limit."""
        room = self.context - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context is {self.context}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        most = min(room, self.options.max_tokens_limit)
        if requested is None:
            return most
        if requested > most:
            raise ApiError(
                400,
                f"{param} is {requested}; at most {most} here (server limit "
                f"{self.options.max_tokens_limit}, context {self.context} - prompt {prompt_len})",
                param=param,
                code="max_tokens_too_large",
            )
        return requested

    def check_logit_bias(self, bias: dict[int, float] | None) -> tuple[tuple[int, float], ...]:
        bad = [t for t in bias or {} if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"logit_bias names token {bad[0]}, outside the vocabulary (0..{self.vocab_size - 1})",
                param="logit_bias",
            )
        return tuple(sorted((bias or {}).items()))

    # --- prompts (tokenizer thread) ----------------------------------------------------------------
    def encode_text(self, prompt: str | list[int], *, param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            try:
                tokens = self.tokenizer.encode(prompt)
            except Exception as e:  # noqa: BLE001 - e.g. lone surrogates, which tokenizers refuse
                raise ApiError(400, f"the prompt cannot be tokenized: {e}", param=param) from None
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(
                    400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param=param
                )
            tokens = list(prompt)
        if not tokens:
            raise ApiError(400, "the prompt is empty", param=param)
        return tokens

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, *, param: str = "messages"
    ) -> list[int]:
        if not self.tokenizer.has_chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
        kwargs = {"tools": tools} if tools else {}
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - the template refused these messages (jinja raises its own types)
            raise ApiError(400, f"the chat template refused the messages: {e}", param=param) from None
        tokens = list(out["input_ids"] if isinstance(out, dict) else out)
        if not tokens:
            raise ApiError(400, "the prompt is empty", param=param)
        return tokens

    # --- grammars (tokenizer thread) ---------------------------------------------------------------
    def json_grammar(self, schema: dict | None, *, param: str) -> Grammar:
        try:
            return self.grammars.json(schema)
        except GrammarError as e:
            raise ApiError(400, f"{param}: {e}", param=param, code="invalid_schema") from None

    def check_tools(self, *, param: str = "tools") -> None:
        if not self.tokenizer.has_tool_calling:
            raise unsupported(param, "this model's chat template has no tool-call format mlx-lm knows")

    def forced_tools(self, tools: list[dict], *, required: bool, name: str | None) -> list[dict] | None:
        """The tools (function definitions) offered, checked; of them, those a call is forced among
        (a named one, or any when `required`), or None when the model may answer in text."""
        if tools:
            self.check_tools()
        if name is not None:
            forced = [t for t in tools if t["name"] == name]
            if not forced:
                raise ApiError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
            return forced
        if required and not tools:
            raise ApiError(400, "tool_choice requires a call but tools is empty", param="tool_choice")
        return tools if required else None

    def output_grammar(
        self, forced: list[dict] | None, *, json_output: bool, schema: dict | None = None, format_param: str
    ) -> Grammar | None:
        """The grammar of the output: a forced call among `forced`, or JSON (matching `schema` if
        given) when `json_output`, or none."""
        if json_output:
            if forced:
                raise unsupported(format_param, "together with a tool_choice that forces a call")
            return self.json_grammar(schema, param=format_param)
        return self.tool_grammar(forced) if forced else None

    def tool_grammar(self, tools: list[dict], *, param: str = "tool_choice") -> Grammar:
        """Force one call among `tools` (OpenAI function definitions: name, parameters)."""
        parser = self.tokenizer.tool_parser.__module__.rsplit(".", 1)[-1]
        if parser != "json_tools":
            raise unsupported(
                param, f"forcing a call needs the JSON tool-call format; this model's is {parser!r}: use 'auto'"
            )
        try:
            return self.grammars.tool_call(self.tokenizer.tool_call_start, self.tokenizer.tool_call_end, tools)
        except GrammarError as e:
            raise ApiError(400, f"tools: {e}", param="tools", code="invalid_schema") from None

    def ended_by(self, stats, stops: list[str]) -> tuple[str, str | None]:
        """How a finished generation ended: ("eos" | "stop_sequence" | "length" | "cancelled", the
        stop sequence that ended it)."""
        if stats.finish_reason != "stop":
            return stats.finish_reason or "length", None
        if stats.tokens and stats.tokens[-1] in self.tokenizer.eos_token_ids:
            return "eos", None
        tail = self.tokenizer.decode(stats.tokens)[len(stats.text) :]
        return "stop_sequence", next((s for s in stops if tail.startswith(s)), stops[0] if stops else None)
