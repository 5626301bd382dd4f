"""Reasoning and tool calls in generated text, with mlx-lm's own machinery: its text state machine
(the markers of the model's chat template: <think>, the tool-call start and end) and the tool
parser it chose for the template (mlx_lm.tool_parsers), as mlx_lm.server does.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field

from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @property
    def input(self) -> dict:
        """The arguments as an object (Anthropic's tool_use `input`)."""
        try:
            value = json.loads(self.arguments or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {"value": value}


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def initial_state(tokenizer: TokenizerWrapper, prompt: list[int]) -> str:
    """Where the text starts: inside reasoning when the prompt opened a <think> it did not close."""
    if tokenizer.response_initial_state:
        return tokenizer.response_initial_state
    if tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
        return "reasoning"
    return "normal"


class TextSplitter:
    """One choice's text, split into content, reasoning and tool calls as it streams. With
    `tools` None (the request offered none) a tool-call-looking text stays content, markers and all."""

    def __init__(self, tokenizer: TokenizerWrapper, prompt: list[int], *, tools: list[dict] | None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools
        self._machine = make_text_state_machine(tokenizer)
        self._state = self._machine.make_state(initial_state(tokenizer, prompt))
        self._tool_text = ""
        self._in_tool = False
        self.made_tool_call = False

    def feed(self, text: str) -> Delta:
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._collect(segments)

    def finish(self) -> Delta:
        """The text held back for a marker that never completed, and a call cut short."""
        self._state, rest, name = TextStateMachine.flush(self._state)
        delta = self._collect([(name, rest)])
        if self._in_tool:
            self._end_call(delta)
        return delta

    def _collect(self, segments: list[tuple[str | None, str]]) -> Delta:
        delta = Delta()
        for name, piece in segments:
            if self._in_tool and name != "tool":
                self._end_call(delta)
            if name == "tool":
                self._in_tool = True
                self._tool_text += piece
            elif name == "reasoning":
                delta.reasoning += piece
            elif name is not None:
                delta.content += piece
        return delta

    def _end_call(self, delta: Delta) -> None:
        text, self._tool_text, self._in_tool = self._tool_text, "", False
        if self.tools is None:  # not asked for: the text as the model wrote it
            end = self.tokenizer.tool_call_end or ""
            delta.content += self.tokenizer.tool_call_start + text + end
            return
        calls = parse_tool_calls(self.tokenizer, text, self.tools)
        if calls:
            self.made_tool_call = True
            delta.tool_calls.extend(calls)
        else:
            delta.content += text


def parse_tool_calls(tokenizer: TokenizerWrapper, text: str, tools: list[dict]) -> list[ToolCall]:
    """The calls in one tool-call block, by the model's own mlx-lm parser; none if it cannot parse
    them (a call cut short by max_tokens)."""
    try:
        parsed = tokenizer.tool_parser(text, tools)
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        log.info("a tool call did not parse (%s: %s)", type(e).__name__, e)
        return []
    calls = []
    for call in parsed if isinstance(parsed, list) else [parsed]:
        arguments = call.get("arguments", {})
        calls.append(
            ToolCall(
                id=call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                name=str(call.get("name", "")),
                arguments=arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
            )
        )
    return calls
