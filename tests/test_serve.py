"""`flashmesh serve`: the official openai client against a real server on 127.0.0.1, exactness
against mlx-lm's own generation, concurrency, cancellation, status codes, metrics, CLI errors."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
from flashmesh.coordinator.api.worker import DoneEvent, ErrorEvent, QueueFull, TextEvent
from flashmesh.coordinator.cli import main
from flashmesh.coordinator.generate import SamplingParams, StopMatcher, encode_prompt, generate
from flashmesh.coordinator.options import ModelOptions
from flashmesh.node.store_format import Manifest
from mlx_lm import load
from prometheus_client.parser import text_string_to_metric_families

from .conftest import PROMPT, assert_one_line_error
from .serve_util import MODEL, served

OTHER = "Streaming experts from flash, one token at a time"


@pytest.fixture(scope="module")
def tiny(models):
    return models.get("qwen3_moe")


@pytest.fixture(scope="module")
def server(tiny):
    with served(tiny[1], max_tokens_limit=512, max_body_bytes=64 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny):
    """Greedy generation by mlx-lm itself on the unpacked model."""
    model, tokenizer = load(str(tiny[0]))

    def run(prompt: str, *, max_tokens: int, chat: bool = False):
        tokens = encode_prompt(tokenizer, prompt, chat=chat)
        return tokens, generate(model, tokenizer, tokens, SamplingParams(max_tokens=max_tokens))

    return run


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=60)


def metric(server, name: str, **labels) -> float:
    status, _, body = server.raw("GET", "/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_models_and_completion_match_mlx_lm(client, reference):
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt, ref = reference(PROMPT, max_tokens=12)
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = out.choices[0]
    assert choice.text == ref.text
    assert choice.model_extra["token_ids"] == ref.tokens
    assert choice.finish_reason == ref.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(ref.tokens))
    assert out.usage.total_tokens == len(prompt) + len(ref.tokens)
    # Token ids as the prompt give the same answer.
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert again.choices[0].text == ref.text


def test_chat_stream_and_not(client, reference):
    prompt, ref = reference(PROMPT, max_tokens=10, chat=True)
    messages = [{"role": "user", "content": PROMPT}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(ref.tokens))

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.tokens)

    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference(PROMPT, max_tokens=10)[1].text


def test_sse_wire_format_ends_with_done(server):
    status, headers, body = server.raw(
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}).encode(),
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_concurrent_requests_each_get_what_they_get_alone(client):
    def ask(prompt: str, stream: bool) -> str:
        if stream:
            chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    alone = {p: ask(p, False) for p in (PROMPT, OTHER)}
    results: dict = {}
    threads = [
        threading.Thread(target=lambda p=p, s=s, i=i: results.__setitem__(i, (p, ask(p, s))))
        for i, (p, s) in enumerate([(PROMPT, True), (OTHER, False), (OTHER, True), (PROMPT, False)])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    for prompt, text in results.values():
        assert text == alone[prompt]


def test_stop_sequences_and_seed(client, reference):
    _, ref = reference(PROMPT, max_tokens=24)
    stop = ref.text[5:8]
    cut = ref.text.index(stop)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].text == ref.text[:cut] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == ref.text[:cut]

    def sampled(seed: int) -> str:
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return r.choices[0].text

    assert sampled(7) == sampled(7)


def test_bad_requests_get_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for bad in (
        {"max_tokens": 0},
        {"max_tokens": 10**9},
        {"temperature": -1},
        {"top_p": 2},
        {"stop": [""]},
        {"logit_bias": {"99999": 1}},
    ):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", **{"max_tokens": 2, **bad})
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument: frobnicate"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt=[1] * 5000, max_tokens=2)

    for method, path, body, want in [
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", b"x" * (65 * 1024), 413),
        ("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400),
        ("GET", "/v1/completions", None, 405),
        ("GET", "/v1/nothing-here", None, 404),
        ("GET", f"/v1/models/{MODEL}", None, 200),
        ("GET", "/v1/models/other", None, 404),
    ]:
        status, _, raw = server.raw(method, path, body)
        assert status == want, (path, raw)
        if status != 200:
            assert set(json.loads(raw)["error"]) >= {"message", "type", "param", "code"}
    status, _, body = server.raw("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_full_queue_answers_503_with_retry_after(server):
    """Hold the worker with a job whose receiver blocks, fill the queue, then ask over HTTP."""
    release, held = threading.Event(), threading.Event()

    def blocking(event) -> None:
        held.set()
        release.wait(30)

    params = SamplingParams(max_tokens=2)
    jobs = [server.worker.submit([1, 2, 3], params, blocking)]
    assert held.wait(30)
    try:
        jobs += [server.worker.submit([1, 2, 3], params, lambda e: None) for _ in range(server.worker.max_queue)]
        with pytest.raises(QueueFull):
            server.worker.submit([1], params, lambda e: None)
        status, headers, body = server.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert status == 503 and int(headers["retry-after"]) >= 1 and body["error"]["code"] == "queue_full"
        assert metric(server, "flashmesh_queue_depth") == server.worker.max_queue + 1
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while server.worker.queue_depth and time.monotonic() < deadline:
        time.sleep(0.05)
    status, _, _ = server.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 200


def test_worker_cancels_at_the_next_token(server):
    events: queue.Queue = queue.Queue()
    holder = {}

    def on_event(event) -> None:
        events.put(event)
        if isinstance(event, TextEvent) and "at" not in holder:
            holder["at"] = event.completion_tokens
            holder["job"].cancel()

    holder["job"] = server.worker.submit([5, 6, 7], SamplingParams(max_tokens=200), on_event)
    while True:
        event = events.get(timeout=30)
        if isinstance(event, DoneEvent | ErrorEvent):
            break
    assert isinstance(event, DoneEvent) and event.stats.finish_reason == "cancelled"
    assert len(event.stats.tokens) == holder["at"]  # not one token more


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(server, stream):
    before = metric(server, "flashmesh_generations_total", finish_reason="cancelled")
    tokens_before = metric(server, "flashmesh_generated_tokens_total")
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    no_eos = {str(server.worker.tokenizer.eos_token_id): -100}  # so only a cancel can end it early
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "stream": stream, "logit_bias": no_eos})
    body = body.encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if stream:  # leave after the first event
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    else:  # leave once the generation has started
        deadline = time.monotonic() + 30
        while server.worker.queue_depth == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    sock.close()
    deadline = time.monotonic() + 30
    while metric(server, "flashmesh_generations_total", finish_reason="cancelled") == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    assert metric(server, "flashmesh_generated_tokens_total") - tokens_before < 500


def test_metrics_parse_and_count(client, server):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4, temperature=0)
    server.raw("POST", "/v1/completions", b"{")
    status, headers, body = server.raw("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    for name in (
        "flashmesh_generated_tokens_total", "flashmesh_decode_tokens_per_second", "flashmesh_expert_cache_hit_rate",
        "flashmesh_expert_bytes_read_total", "flashmesh_queue_depth", "flashmesh_http_requests_total",
        "flashmesh_time_to_first_token_seconds_count",
    ):  # fmt: skip
        assert name in names, name
    assert metric(server, "flashmesh_http_requests_total", path="/v1/completions", status="200") >= 1
    assert metric(server, "flashmesh_http_requests_total", path="/v1/completions", status="400") >= 1
    assert metric(server, "flashmesh_generated_tokens_total") >= 4
    assert metric(server, "flashmesh_expert_bytes_read_total") > 0
    assert 0 < metric(server, "flashmesh_expert_cache_hit_rate") <= 1


def test_cluster_mode_matches_and_reports_node_latency(tiny, reference, tmp_path):
    """Experts on a node process on loopback: same text as mlx-lm, per-node dispatch latency in /metrics."""
    from flashmesh.coordinator.engine import open_model
    from flashmesh.testing.local_nodes import local_nodes

    store = tiny[1]
    budget = Manifest.load(store).expert_bytes_total
    with local_nodes([store], budgets=[budget], token="serve-test", logdir=tmp_path) as addresses:
        opener = lambda: open_model(ModelOptions(store=store, cluster=True, nodes=tuple(addresses), token="serve-test"))  # noqa: E731
        with served(store, opener=opener) as s:
            assert len(s.worker.streaming.nodes) == 1
            _, ref = reference(PROMPT, max_tokens=8)
            status, _, body = s.post(
                "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            )
            assert status == 200 and body["choices"][0]["text"] == ref.text
            assert metric(s, "flashmesh_node_dispatch_seconds_count") > 0
            assert metric(s, "flashmesh_layer_dispatch_seconds_count") > 0
            assert metric(s, "flashmesh_expert_bytes_read_total") > 0


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(("END",))
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("yEND more") == ("y", True)
    assert m.text == "abc ENxy"


def test_serve_cli_errors_are_one_line(tiny, tmp_path, capsys):
    code = main(["serve", str(tmp_path / "missing"), "--port", "0"])
    assert_one_line_error(code, capsys.readouterr().err, "missing")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code = main(["serve", str(tiny[1]), "--port", str(taken.getsockname()[1])])
        assert_one_line_error(code, capsys.readouterr().err, "--port")
    code = main(["serve", str(tiny[1]), "--cluster", "--no-zeroconf", "--token", "t"])
    assert_one_line_error(code, capsys.readouterr().err, "--node")


def test_serve_command_runs_and_stops(tiny):
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashmesh.coordinator.cli", "serve", str(tiny[1]), "--port", "0", "--model-name", "m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving m"), line + proc.stderr.read()
        url = line.split(" at ")[1].strip()
        out = openai.OpenAI(base_url=url, api_key="x", max_retries=0).completions.create(
            model="m", prompt="hi", max_tokens=3
        )
        assert out.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
