"""`grok serve` through the official `openai` client and raw HTTP: completions and chat, streamed
and not, stop strings, seeds, usage, logprobs, n, echo, and every kind of bad request.

One server process (the demo model, an API key) serves the whole module; the oracle for every
generated text is `grokcli.generate` on the same model in this process.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import grokcli
from grokcli import paths
from grokcli.server.chat import HUMAN_ASSISTANT

from server_helpers import API_KEY, ServerProcess, metric


PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--api-key", API_KEY).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def demo():
    return grokcli.load(paths.demo_model_dir())


def alone(demo, prompt, **kw):
    """What `grokcli.generate` makes of the same request (the oracle)."""
    model, tok = demo
    return grokcli.generate(model, tok, prompt, continuation=True, **kw)


def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


# --- completions -----------------------------------------------------------------------------------


def test_completion_equals_generate_with_usage(client, demo):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    want = alone(demo, PROMPT, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.text == want.text and want.text
    assert choice.finish_reason == "length"
    assert r.object == "text_completion" and r.model == "demo"
    assert r.usage.prompt_tokens == len(demo[1].encode(PROMPT))
    assert r.usage.completion_tokens == len(want.token_ids) == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_streamed_completion_equals_the_whole_one(client, demo):
    want = alone(demo, PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    for line in lines[:-1]:
        assert json.loads(line[len("data: "):])["object"] == "text_completion"


def test_stop_string_cuts_the_text(client, demo):
    full = alone(demo, PROMPT, max_tokens=40, temperature=0).text
    stop = full[len(full) // 2:][:6]  # text from the middle of the greedy answer
    assert stop.strip()
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_seed_reproduces_and_matches_generate(client, demo):
    def sample(seed):
        return client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=1.0, seed=seed,
                                         top_p=0.95).choices[0].text

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    assert first == alone(demo, PROMPT, max_tokens=30, temperature=1.0, seed=7, top_p=0.95).text


def test_logprobs_match_generate(client, demo):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    want = alone(demo, PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert lp.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the most likely token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_n_choices_sample_like_a_batch(client, demo):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=2)
    model, tok = demo
    want = grokcli.generate_batch(model, tok, [PROMPT, PROMPT], temperature=1.0, seed=3, max_tokens=12,
                                  continuation=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))


def test_list_of_prompts_and_token_ids(client, demo):
    ids = demo[1].encode("The little dog")
    r = client.completions.create(model="demo", prompt=[PROMPT, "The little dog"], max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == [alone(demo, p, max_tokens=6, temperature=0).text
                                           for p in (PROMPT, "The little dog")]
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[1].text


def test_echo_prepends_the_prompt(client):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model="demo", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


# --- chat --------------------------------------------------------------------------------------------


MESSAGES = [{"role": "system", "content": "A friendly talk."},
            {"role": "user", "content": "Tell me about the little dog."}]


def chat_prompt() -> str:
    return HUMAN_ASSISTANT.render([(m["role"], m["content"]) for m in MESSAGES])


def test_chat_uses_the_named_template(client, demo):
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=30, temperature=0)
    want = alone(demo, chat_prompt(), max_tokens=30, temperature=0, stop=HUMAN_ASSISTANT.stop)
    assert r.object == "chat.completion"
    assert r.model_extra["chat_template"] == "human-assistant"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(demo[1].encode(chat_prompt()))
    assert r.usage.completion_tokens == len(want.token_ids)


def test_chat_stream_equals_chat(client):
    whole = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
        assert entry.bytes == list(entry.token.encode())


# --- models, health, metrics --------------------------------------------------------------------------


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    # While it loaded and compiled, /health said so with a 503.
    assert server.loading_answers and all(a == (503, {"status": "loading"}) for a in server.loading_answers)
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert metric(text, "grok_kv_slots") == 16
    assert metric(text, "grok_requests_running") == 0
    assert metric(text, "grok_generation_tokens_total") > 0
    assert metric(text, "grok_time_to_first_token_seconds_count") > 0
    assert metric(text, "grok_time_per_output_token_seconds_count") > 0
    assert metric(text, "grok_prompt_tokens_total") > 0


# --- bad requests -------------------------------------------------------------------------------------

LONG = list(range(5, 605))  # 600 token ids: more than the demo's 512-token context

BAD = [
    # (endpoint, body, status, param, code)
    ("completions", b"{not json", 400, None, "invalid_json"),
    ("completions", b"[1, 2]", 400, None, "invalid_request_body"),
    ("completions", {"model": "demo", "prompt": PROMPT, "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("completions", {"model": "demo", "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("completions", {"model": "demo", "prompt": PROMPT, "max_tokens": 10**6}, 400, "max_tokens", "invalid_value"),
    ("completions", {"model": "demo", "prompt": PROMPT, "temperature": 3}, 400, "temperature", "invalid_value"),
    ("completions", {"model": "demo", "prompt": PROMPT, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("completions", {"model": "demo", "prompt": PROMPT, "stream": "yes"}, 400, "stream", "invalid_value"),
    ("completions", {"model": "demo", "prompt": 5}, 400, "prompt", "invalid_value"),
    ("completions", {"model": "demo", "prompt": [1, "a"]}, 400, "prompt", "invalid_value"),
    ("completions", {"model": "demo", "prompt": [99999]}, 400, "prompt", None),
    ("completions", {"model": "demo", "prompt": ""}, 400, "prompt", None),
    ("completions", {"model": "demo"}, 400, "prompt", "missing_required_parameter"),
    ("completions", {"model": "demo", "prompt": PROMPT, "bogus": 1}, 400, "bogus", "unknown_parameter"),
    ("completions", {"model": "demo", "prompt": PROMPT, "n": 100}, 400, "n", "invalid_value"),
    ("completions", {"model": "demo", "prompt": PROMPT, "logprobs": 50}, 400, "logprobs", "invalid_value"),
    ("completions", {"model": "demo", "prompt": PROMPT, "stop": [""]}, 400, "stop", None),
    ("completions", {"model": "demo", "prompt": PROMPT, "presence_penalty": 1.0}, 400, "presence_penalty",
     "unsupported_parameter"),
    ("completions", {"model": "demo", "prompt": PROMPT, "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("completions", {"model": "demo", "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"model": "demo", "prompt": PROMPT, "max_tokens": 510}, 400, "max_tokens",
     "context_length_exceeded"),
    ("completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model", "model_not_found"),
    ("chat/completions", {"model": "demo", "messages": []}, 400, "messages", "invalid_value"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role",
     "invalid_value"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content", "invalid_value"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, 400,
     "tools", "unsupported_parameter"),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs", None),
]


@pytest.mark.parametrize("endpoint, body, status, param, code", BAD,
                         ids=[f"{i}-{b[3] or b[4]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_an_openai_error(server, endpoint, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/{endpoint}", content=content, timeout=30,
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code
    assert err["message"] and "Traceback" not in r.text and "/site-packages/" not in r.text


def test_too_long_prompt_says_both_lengths(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "demo", "prompt": LONG}, headers=auth(), timeout=30)
    message = r.json()["error"]["message"]
    assert "512" in message and "600" in message


def test_bad_request_through_the_client_raises(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=-3)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT)


@pytest.mark.parametrize("header, code", [(None, "missing_api_key"), ("Bearer wrong-key", "invalid_api_key"),
                                          (f"Basic {API_KEY}", "missing_api_key")])
def test_api_key_is_required(server, header, code):
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models")):
        r = httpx.request(method, server.url + path, json={"model": "demo", "prompt": PROMPT}, headers=headers,
                          timeout=30)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == code and r.headers["www-authenticate"] == "Bearer"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_oversized_body_and_unknown_route(server):
    big = b'{"prompt": "' + b"a" * (3 * 2**20) + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, headers=auth(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/nothing-here", headers=auth(), timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions", headers=auth(), timeout=30)
    assert r.status_code == 405 and "error" in r.json()
