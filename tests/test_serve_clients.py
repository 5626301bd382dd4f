"""Anthropic's Messages API and OpenAI's Responses API, each with its official Python client
(`anthropic`, `openai`): text equal to mlx-lm's greedy output, streaming events, tool use, errors
in each API's own shape."""

from __future__ import annotations

import json
import shutil

import anthropic
import openai
import pytest
from flashmesh.coordinator.generate import SamplingParams, generate
from mlx_lm import load

from .conftest import PROMPT
from .serve_util import MODEL, TOOLS_TEMPLATE, served

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """The tiny model, with a chat template that has a JSON tool-call format."""
    store = tmp_path_factory.mktemp("clients") / "store"
    shutil.copytree(models.get("qwen3_moe")[1], store)
    (store / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    with served(store, max_tokens_limit=256) as s:
        yield s


@pytest.fixture(scope="module")
def reference(models, server):
    """mlx-lm's greedy text on the unpacked model, for messages rendered by the served template."""
    model, _ = load(str(models.get("qwen3_moe")[0]))
    tokenizer = server.worker.tokenizer

    def run(messages: list[dict], max_tokens: int) -> str:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return generate(model, tokenizer, prompt, SamplingParams(max_tokens=max_tokens)).text

    return run


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def test_anthropic_messages_text_and_stream(claude, reference):
    want = reference([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}], 12)
    kwargs = dict(
        model=MODEL,
        max_tokens=12,
        extra_body={"temperature": 0},  # the current API has no temperature; this server still takes it
        system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
    )
    message = claude.messages.create(**kwargs)
    assert message.role == "assistant" and message.content[0].type == "text"
    assert message.content[0].text == want
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens >= 1
    with claude.messages.stream(**kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == want == final.content[0].text and final.stop_reason == message.stop_reason
    assert claude.messages.count_tokens(model=MODEL, messages=kwargs["messages"], system="Be brief.").input_tokens > 0


def test_anthropic_tool_use_round_trip(claude):
    tools = [{"name": "get_weather", "description": "the weather in a city", "input_schema": WEATHER_SCHEMA}]
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    message = claude.messages.create(
        model=MODEL,
        max_tokens=80,
        extra_body={"temperature": 0},
        tools=tools,
        messages=ask,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city", "days"}
    with claude.messages.stream(
        model=MODEL,
        max_tokens=80,
        extra_body={"temperature": 0},
        tools=tools,
        messages=ask,
        tool_choice={"type": "any"},
    ) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [use.input]
    # The call and its result go back for the next turn.
    follow = ask + [
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]},
    ]
    assert claude.messages.create(model=MODEL, max_tokens=3, tools=tools, messages=follow).usage.input_tokens > 0
    shaped = claude.messages.create(
        model=MODEL,
        max_tokens=60,
        messages=ask,
        output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}},
    )
    assert set(json.loads(shaped.content[0].text)) == {"city", "days"}


def test_anthropic_errors_are_anthropic_shaped(claude, server):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nope", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(
            model=MODEL,
            max_tokens=2,
            messages=[{"role": "user", "content": "x"}],
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert "thinking" in e.value.body["error"]["message"]
    status, _, body = server.raw("POST", "/v1/messages", b"{")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_responses_text_stream_and_errors(oai, reference):
    want = reference([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}], 12)
    response = oai.responses.create(
        model=MODEL, instructions="Be brief.", input=PROMPT, max_output_tokens=12, temperature=0
    )
    assert response.output_text == want and response.status in ("completed", "incomplete")
    assert response.usage.output_tokens >= 1
    events = list(
        oai.responses.create(
            model=MODEL, instructions="Be brief.", input=PROMPT, max_output_tokens=12, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1].startswith("response.")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert events[-1].response.output_text == want
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
    assert "previous_response_id" in e.value.body["message"]


def test_responses_function_call_and_json(oai):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}]
    response = oai.responses.create(
        model=MODEL, input="Weather?", tools=tools, tool_choice="required", max_output_tokens=80, temperature=0
    )
    (call,) = [o for o in response.output if o.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city", "days"}
    follow = [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"},
    ]
    assert oai.responses.create(model=MODEL, input=follow, tools=tools, max_output_tokens=3).usage.input_tokens > 0
    shaped = oai.responses.create(
        model=MODEL,
        input="Weather as JSON",
        max_output_tokens=60,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER_SCHEMA}},
    )
    assert set(json.loads(shaped.output_text)) == {"city", "days"}
