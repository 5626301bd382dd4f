"""OpenAI API parity beyond plain text, with the official `openai` client: logprobs, echo, several
prompts, n, JSON output (llguidance), tool calls parsed by mlx-lm's parser for the chat template,
and parameters refused by name. The values are checked against mlx-lm's own generation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import openai
import pytest
from flashmesh.coordinator.generate import encode_prompt
from mlx_lm import load
from mlx_lm.generate import stream_generate

from .conftest import PROMPT
from .serve_util import MODEL, TOOLS_TEMPLATE, metric, served

OTHER = "Streaming experts from flash, one token at a time"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def tiny(models):
    return models.get("qwen3_moe")


@pytest.fixture(scope="module")
def reference(tiny):
    """mlx-lm's own greedy tokens and the logprob of each (stream_generate on the unpacked model)."""
    model, tokenizer = load(str(tiny[0]))

    def run(prompt: str, *, max_tokens: int, chat: bool = False) -> tuple[list[int], list[float], str]:
        tokens = encode_prompt(tokenizer, prompt, chat=chat)
        out = list(stream_generate(model, tokenizer, tokens, max_tokens=max_tokens))
        eos = set(tokenizer.eos_token_ids)
        logprobs = [r.logprobs[r.token].item() for r in out if r.token not in eos]
        return [r.token for r in out], logprobs, "".join(r.text for r in out)

    return run


@pytest.fixture(scope="module")
def server(tiny):
    with served(tiny[1], max_tokens_limit=512, max_queue=8) as s:
        yield s


@pytest.fixture(scope="module")
def tool_server(tiny, tmp_path_factory):
    """The tiny store with a chat template that has a JSON tool-call format (mlx-lm picks json_tools)."""
    store = tmp_path_factory.mktemp("tools") / "store"
    shutil.copytree(tiny[1], store)
    (store / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    with served(store, max_tokens_limit=512) as s:
        yield s


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def test_chat_logprobs_are_mlx_lms(server, reference):
    tokens, logprobs, text = reference(PROMPT, max_tokens=10, chat=True)
    out = client_of(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = out.choices[0]
    assert choice.message.content == text
    content = choice.logprobs.content
    assert len(content) == len(logprobs)
    np.testing.assert_allclose([c.logprob for c in content], logprobs, rtol=0, atol=1e-5)
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy: the best
    streamed = client_of(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
        stream=True,
    )
    chunks = [c for c in streamed if c.choices and c.choices[0].logprobs]
    assert [e.logprob for c in chunks for e in c.choices[0].logprobs.content] == [c.logprob for c in content]


def test_completion_logprobs_echo_prompts_and_n(server, reference):
    client = client_of(server)
    _, logprobs, text = reference(PROMPT, max_tokens=8)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == text == out.choices[0].text
    np.testing.assert_allclose(lp.token_logprobs, logprobs, rtol=0, atol=1e-5)
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0

    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + text

    both = client.completions.create(model=MODEL, prompt=[PROMPT, OTHER], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    other = reference(OTHER, max_tokens=8)[2]
    assert [c.text for c in both.choices] == [text, text, other, other]
    assert both.usage.prompt_tokens == len(encode_prompt(server.worker.tokenizer, PROMPT, chat=False)) + len(
        encode_prompt(server.worker.tokenizer, OTHER, chat=False)
    )

    sampled = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=1.0,
        n=3,
        seed=11,
        stream=True,
    )
    by_index: dict[int, str] = {}
    for c in sampled:
        for choice in c.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(by_index) == [0, 1, 2]
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=1.0, n=3, seed=11
    )
    assert [c.message.content for c in again.choices] == [by_index[i] for i in range(3)]  # seed + choice, alone


def test_max_completion_tokens_bounds_the_reply_like_max_tokens(server, reference):
    tokens, _, text = reference(PROMPT, max_tokens=5, chat=True)
    out = client_of(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=5, temperature=0
    )
    assert out.choices[0].message.content == text and out.usage.completion_tokens == len(tokens) == 5
    assert out.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "response_format,max_tokens",
    [
        ({"type": "json_object"}, 24),  # random weights never close a string: the budget closes it
        ({"type": "json_object"}, 200),
        ({"type": "json_schema", "json_schema": {"name": "answer", "schema": WEATHER["function"]["parameters"]}}, 60),
    ],
)
def test_json_output_parses_whatever_the_weights(server, response_format, max_tokens):
    out = client_of(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        response_format=response_format,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    assert isinstance(value, dict)
    if response_format["type"] == "json_schema":
        assert value["city"] in ("Paris", "Oslo") and 1 <= value["days"] <= 7 and set(value) == {"city", "days"}


def test_forced_tool_call_is_parsed_and_streamed(tool_server):
    client = client_of(tool_server)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=100, temperature=0, tools=[WEATHER], tool_choice="required"
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "days"}

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=100,
        temperature=0,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "get_weather", call.function.arguments)
    ]

    # The call and its result go back into the template for the next turn.
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    again = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=4, temperature=0, tools=[WEATHER])
    assert again.usage.prompt_tokens > out.usage.prompt_tokens


def test_unsupported_parameters_are_refused_by_name(server):
    client = client_of(server)
    hi = [{"role": "user", "content": "hi"}]
    for call, needle in [
        (lambda: client.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, tools=[WEATHER]), "tools"),
        (lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True, logprobs=1), "logprobs"),
        (lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=2, best_of=2), "best_of"),
        (
            lambda: client.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, top_logprobs=2),
            "top_logprobs",
        ),
        (lambda: client.chat.completions.create(model=MODEL, messages=hi, max_tokens=2, n=99), "n"),
        (
            lambda: client.chat.completions.create(
                model=MODEL,
                messages=hi,
                max_tokens=2,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            ),
            "response_format",
        ),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert needle in e.value.body["message"] and "\n" not in e.value.body["message"], e.value.body


def test_second_turn_reuses_the_conversations_kv_cache(server, tiny):
    """Turn 2 starts from turn 1's KV cache (prompt and reply): only the new tokens are computed,
    and the reply is still mlx-lm's for the whole conversation computed from scratch."""
    client = client_of(server)
    first = [{"role": "user", "content": PROMPT}]
    one = client.chat.completions.create(model=MODEL, messages=first, max_tokens=12, temperature=0)
    hits = metric(server, "flashmesh_prompt_cache_hits_total")
    second = first + [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": OTHER},
    ]
    two = client.chat.completions.create(model=MODEL, messages=second, max_tokens=12, temperature=0)
    assert metric(server, "flashmesh_prompt_cache_hits_total") == hits + 1
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(encode_prompt(server.worker.tokenizer, PROMPT, chat=True))  # at least all of turn 1's prompt
    assert metric(server, "flashmesh_prompt_cache_tokens_reused_total") >= cached
    assert 0 < metric(server, "flashmesh_prompt_cache_bytes") and metric(server, "flashmesh_prompt_cache_entries") <= 8
    tokenizer = server.worker.tokenizer
    model, _ = load(str(tiny[0]))
    prompt = tokenizer.apply_chat_template(second, add_generation_prompt=True)
    alone = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=12))
    assert two.choices[0].message.content == alone
