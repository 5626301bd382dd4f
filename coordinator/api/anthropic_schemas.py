"""Request bodies of Anthropic's Messages API (/v1/messages), and their translation to the chat
template's messages (Hugging Face's convention: tool calls on the assistant, role "tool" results)."""

from __future__ import annotations

from typing import Annotated, Literal

from flashmesh.coordinator.api.schemas import Strict, check_seed, stop_list
from pydantic import Field, field_validator

MAX_ANTHROPIC_STOPS = 8


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: str | None = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None  # accepted: the server caches prompts by itself
    citations: None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict
    cache_control: CacheControl | None = None
    caller: dict | None = None  # what the client echoes back from a response's block
    toolset_name: str | None = None


class ThinkingBlock(Strict):
    """An earlier turn's thinking, echoed back: not shown to the model again (as its templates do)."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class AnthropicMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    def for_template(self) -> list[dict]:
        """One template message, or several: each tool result becomes its own role "tool" message."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        out, text, calls = [], "", []
        for block in self.content:
            if isinstance(block, TextBlock):
                text += block.text
            elif isinstance(block, ToolUseBlock):
                calls.append(
                    {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}}
                )
            elif isinstance(block, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        if text or calls or not out:
            message: dict = {"role": self.role, "content": text}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        return out


class AnthropicTool(Strict):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None

    def as_function(self) -> dict:
        return {"name": self.name, "description": self.description or "", "parameters": self.input_schema}


class AnthropicToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(Strict):
    user_id: str | None = None


class Thinking(Strict):
    # "adaptive": the model thinks as its chat template has it (its reasoning comes back as thinking
    # blocks); a thinking budget ("enabled") is not implemented: refused by validation.
    type: Literal["disabled", "adaptive"]
    display: Literal["summarized"] | None = None


class JsonOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(Strict):
    format: JsonOutputFormat | None = None  # structured output, enforced by the grammar
    effort: None = None


class MessagesRequest(Strict):
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)  # older clients send these three
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    cache_control: CacheControl | None = None  # accepted: the server caches prompts by itself
    output_config: OutputConfig | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: Metadata | None = None
    thinking: Thinking | None = None
    seed: int | None = None  # an extension: Anthropic's API has no seed

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str]:
        return stop_list(v, most=MAX_ANTHROPIC_STOPS)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        return check_seed(v)

    def template_messages(self) -> list[dict]:
        out = []
        if self.system:
            text = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": text})
        for m in self.messages:
            out.extend(m.for_template())
        return out


class CountTokensRequest(Strict):
    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: Thinking | None = None
    cache_control: CacheControl | None = None
    output_config: OutputConfig | None = None

    template_messages = MessagesRequest.template_messages
