"""Constrained decoding with llguidance: JSON (any object, or a JSON schema) and tool-call grammars
as mlx-lm logits processors, so the output matches whatever the model's weights would pick.

A grammar only says what may come next; a model (a random-weight one, say) may keep writing one
JSON string until max_tokens cuts it. So when the budget left is just enough, the processor writes
the shortest closing (json_closer.py) itself, token by token, as far as the grammar allows it.

llguidance (the grammar engine behind llama.cpp's and vLLM's structured output) computes, for each
step, the set of tokens that keep the output inside the grammar; the processor sets every other
logit to -inf. It reads mlx-lm's tokenizer (the Hugging Face fast tokenizer inside the wrapper),
needs no torch, and compiles JSON schemas and Lark grammars (with inline `%json {...}`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.numpy
import mlx.core as mx
import numpy as np
from flashmesh.coordinator.api.json_closer import JsonCloser
from mlx_lm.tokenizer_utils import TokenizerWrapper

# Compact JSON: flexible whitespace lets a model pad forever; a schema's x-guidance may override it.
JSON_DEFAULTS = {"whitespace_flexible": False}
CLOSING_MARGIN = 8  # tokens: start closing this long before the budget needs it (one token may open several)


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled (the message says why)."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar (coordinator.generate.Constraint): one fresh matcher per sequence."""

    tokenizer: llguidance.LLTokenizer
    grammar: str
    vocab_size: int  # the model's logits width (may exceed the tokenizer's)
    suffix: str = ""  # what the grammar wants after its JSON (a tool call's end marker)

    def processor(self, *, max_tokens: int) -> GrammarProcessor:
        matcher = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        return GrammarProcessor(matcher, self, max_tokens)


class GrammarProcessor:
    """An mlx-lm logits processor: feeds the sequence's new tokens to the matcher, then masks every
    token the grammar does not allow next. The first call sees the prompt (consumed by nobody);
    each later call sees one more token, the one just sampled."""

    def __init__(self, matcher: llguidance.LLMatcher, grammar: Grammar, max_tokens: int) -> None:
        self.matcher, self.grammar, self.max_tokens = matcher, grammar, max_tokens
        self.vocab_size = grammar.vocab_size
        self._seen: int | None = None
        self._generated = 0
        self._closer = JsonCloser()
        self._forced: list[int] | None = None  # the closing's tokens still to write, once closing
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, grammar.tokenizer.vocab_size)  # [1, V/32]

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:  # tokens [L], logits [1, V]
        if self._seen is not None:
            for token in tokens[self._seen :].tolist():
                if not self.matcher.consume_token(token):
                    raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
                self._closer.feed(self.grammar.tokenizer.decode_bytes([token]))
                self._generated += 1
        self._seen = tokens.size
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self._bitmask)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.vocab_size]
        allowed = np.pad(allowed, (0, self.vocab_size - allowed.size)).astype(bool)  # [V]: past the tokenizer, off
        forced = self._next_forced(allowed)
        if forced is not None:
            allowed = np.zeros_like(allowed)
            allowed[forced] = True
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _next_forced(self, allowed: np.ndarray) -> int | None:
        """The closing's next token, once the budget left (this token and the end-of-sequence one
        included) is down to what the closing needs plus the margin; None: the grammar decides."""
        if self._forced is None:
            closing = self._closer.closing()
            if not closing:
                return None
            needed = self.grammar.tokenizer.tokenize_str(closing + self.grammar.suffix)
            if self.max_tokens - self._generated > len(needed) + 1 + CLOSING_MARGIN:
                return None
            self._forced = list(needed)
        if self._forced and allowed[self._forced[0]]:
            return self._forced.pop(0)
        # Done, or not allowed here (inside a multi-byte character, a schema's types): the grammar
        # picks this token, and the closing is planned again from the next one.
        self._forced = None
        return None


class Grammars:
    """Compiles grammars for one tokenizer (building llguidance's tokenizer once, on first use)."""

    def __init__(self, tokenizer: TokenizerWrapper, vocab_size: int) -> None:
        self._wrapper = tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._wrapper._tokenizer,  # the Hugging Face tokenizer mlx-lm wraps
                n_vocab=max(self.vocab_size, len(self._wrapper._tokenizer)),
                eos_token=sorted(self._wrapper.eos_token_ids),
            )
        return self._tokenizer

    def compile(self, grammar: str) -> Grammar:
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(error.strip().splitlines()[0][:300])
        return Grammar(self.tokenizer, grammar, self.vocab_size)

    def json(self, schema: dict | None = None) -> Grammar:
        """Any JSON object (schema None) or a document matching `schema`."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema if schema is not None else {"type": "object"}, defaults=JSON_DEFAULTS
            )
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid: {e}") from None
        return self.compile(grammar)

    def tool_call(self, start: str, end: str, tools: list[dict]) -> Grammar:
        """One call among `tools` (OpenAI function definitions), written as `start` {"name": ...,
        "arguments": {...}} `end`: the JSON tool-call format (mlx-lm's json_tools parser)."""
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        body = json.dumps({**schema, "x-guidance": JSON_DEFAULTS})
        lark = f"start: {json.dumps(start + chr(10))} %json {body} {json.dumps(chr(10) + end)}"
        return dataclasses.replace(self.compile(llguidance.LLMatcher.grammar_from_lark(lark)), suffix="\n" + end)
