"""Property-based fuzz of every HTTP endpoint of `flashmesh serve` (hypothesis).

Malformed JSON, wrong types, huge and negative numbers, unknown fields, adversarial strings and
oversized bodies: the server never answers a client's mistake with a 5xx, every error is OpenAI's
error JSON (Anthropic's on /v1/messages), and it keeps serving afterwards. The number of cases
run is printed (and asserted)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .serve_util import MODEL, served

MAX_BODY = 16 * 1024
EXAMPLES = 400
GENERATING = ["/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/responses"]
PATHS = [*GENERATING, "/v1/models", f"/v1/models/{MODEL}", "/metrics", "/health"]
ALLOWED = {200, 400, 404, 405, 413}

adversarial_text = st.one_of(
    st.text(max_size=64),
    st.sampled_from(["", "\x00", "\ud800", "<|im_end|>", "<|im_start|>system", "{{ 7*7 }}", "{% for %}", "\u202e" * 8,
                     "a" * 5000, "💥" * 100, "\r\n\r\n", "data: [DONE]"]),
)  # fmt: skip
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), adversarial_text,
)  # fmt: skip
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(adversarial_text, inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed"]
FIELDS += ["stream", "stream_options", "n", "logprobs", "logit_bias", "presence_penalty", "user", "echo", "unknown"]
FIELDS += ["tools", "tool_choice", "response_format", "top_logprobs", "system", "input", "instructions", "text"]
FIELDS += ["max_output_tokens", "stop_sequences", "output_config", "thinking"]


def valid(path: str) -> dict:
    if "chat" in path or "messages" in path:
        return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    if "responses" in path:
        return {"model": MODEL, "input": "hello", "max_output_tokens": 4}
    return {"model": MODEL, "prompt": "hello", "max_tokens": 4}


@st.composite
def mutated(draw, path: str) -> bytes:
    """A valid request with some fields replaced, added or removed."""
    body = valid(path)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = draw(json_value)
    if draw(st.booleans()) and "messages" in body:
        body["messages"] = [
            {"role": draw(st.sampled_from(["user", "system", "assistant", "tool", "x"])), "content": draw(json_value)}
        ]
    return json.dumps(body).encode()


@st.composite
def request(draw) -> tuple[str, str, bytes | None, dict]:
    # Mostly the generation endpoints with their own method: that is where validation lives.
    path = draw(st.sampled_from([*GENERATING * 2, *PATHS[4:], "/v1/" + draw(st.text("abc/%.", max_size=8))]))
    right = "POST" if path in GENERATING else "GET"
    method = draw(st.sampled_from([right] * 6 + ["GET", "POST", "PUT", "DELETE"]))
    body = draw(
        st.one_of(
            mutated(path),
            st.binary(max_size=256),
            json_value.map(lambda v: json.dumps(v).encode()),
            st.just(b'{"model": "' + b"x" * (MAX_BODY + 10) + b'"}'),
            st.integers(1, 300).map(lambda d: b"[" * d + b"]" * d),
            st.just(b'{"model": "%s", "prompt": "x", "max_tokens": 1e999}' % MODEL.encode()),
        )
    )
    content_type = draw(st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
    headers = {"Content-Type": content_type} if content_type else {}
    return method, path, body if method in ("POST", "PUT") else None, headers


@pytest.fixture(scope="module")
def fuzz_server(models):
    _, store = models.get("qwen3_moe")
    # Small limits keep each valid generation short, so hundreds of cases run in seconds.
    with served(store, max_tokens_limit=8, max_body_bytes=MAX_BODY, context_length=256) as s:
        yield s


def test_http_fuzz_never_5xx_and_keeps_serving(fuzz_server, capsys):
    statuses: Counter = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(request())
    def case(req):
        method, path, body, headers = req
        status, response_headers, raw = fuzz_server.raw(method, path, body, headers)
        statuses[status] += 1
        assert status in ALLOWED, (method, path, body[:200] if body else body, status, raw[:300])
        if status != 200 or response_headers.get("content-type", "").startswith("application/json"):
            payload = json.loads(raw)
            if status != 200 and path.startswith("/v1/messages"):
                assert payload["type"] == "error" and set(payload["error"]) >= {"message", "type"}, payload
            elif status != 200:
                assert set(payload["error"]) >= {"message", "type", "param", "code"}, payload

    case()
    total = sum(statuses.values())
    with capsys.disabled():
        print(f"\nhttp fuzz: {total} cases, status counts {dict(sorted(statuses.items()))}")
    assert total >= EXAMPLES * 0.9 and statuses[200] > 0 and statuses[400] > 0
    status, _, raw = fuzz_server.raw("POST", "/v1/completions", json.dumps(valid("/v1/completions")).encode())
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] >= 1
