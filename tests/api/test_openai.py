"""The API through the real `openai` Python client, against a running server.

scripts/api-ci.sh starts the server (`baton serve --workers 2`: a head and two worker processes)
with SmolLM2 and sets BATON_API_URL, BATON_API_KEY and BATON_MODEL_ID. Every call has a
client-side timeout.
"""

import json
import os
import urllib.request

import openai
import pytest

URL = os.environ["BATON_API_URL"]
KEY = os.environ["BATON_API_KEY"]
MODEL = os.environ["BATON_MODEL_ID"]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key=KEY, timeout=120, max_retries=0)


def tokenize(body):
    req = urllib.request.Request(
        URL + "/tokenize",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_non_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # Usage equals the tokenizer's count of the rendered prompt.
    assert r.usage.prompt_tokens == tokenize({"model": MODEL, "messages": MESSAGES})["count"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_max_tokens(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert r.choices[0].text.startswith(" Paris")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == tokenize({"prompt": prompt})["count"]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_stop_sequences(client):
    prompt = "Count: 1, 2, 3,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert " 6," in full, full
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[" 6, 7", "zzz"])
    assert r.choices[0].text == full[: full.index(" 6,")]
    assert r.choices[0].finish_reason == "stop"
    # In chat, a single stop string is never emitted either.
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, stop="Paris")
    assert "Paris" not in c.choices[0].message.content and c.choices[0].finish_reason == "stop"


def test_seed_determinism(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds all gave the same text"


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        # Greedy: the chosen token is the most likely one.
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)


def test_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    bad = openai.OpenAI(base_url=URL + "/v1", api_key="wrong", timeout=60, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
