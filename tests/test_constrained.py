"""JSON output by constrained decoding: the closing written when the budget runs out parses, from
any cut of any compact JSON document; the grammar processor masks what the grammar forbids."""

from __future__ import annotations

import json

import mlx.core as mx
from flashmesh.coordinator.api.constrained import Grammars
from flashmesh.coordinator.api.json_closer import JsonCloser
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.utils import load_tokenizer

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=6), JSON, max_size=4) | st.lists(JSON, max_size=4))
def test_every_cut_of_a_document_closes_into_json(value):
    text = json.dumps(value, separators=(",", ":")).encode()
    for cut in range(1, len(text) + 1):
        closer = JsonCloser()
        closer.feed(text[:cut])
        json.loads(text[:cut] + closer.closing().encode())


def test_a_budget_closes_an_object_that_never_would(models):
    """Logits that always prefer one letter: inside a key the model would write it forever."""
    src, _ = models.get("qwen3_moe")
    tokenizer = load_tokenizer(src)
    grammar = Grammars(tokenizer, 384).json(None)
    letter = tokenizer.encode("a")[0]
    processor = grammar.processor(max_tokens=30)
    tokens = tokenizer.encode("hi")
    for _ in range(30):
        logits = mx.zeros((1, 384)).at[0, letter].add(5.0)
        token = int(mx.argmax(processor(mx.array(tokens), logits), axis=-1).item())
        if token in tokenizer.eos_token_ids:
            break
        tokens.append(token)
    value = json.loads(tokenizer.decode(tokens[len(tokenizer.encode("hi")) :]))
    assert isinstance(value, dict) and value
