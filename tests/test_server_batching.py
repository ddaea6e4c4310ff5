"""Continuous batching in a real `grok serve` process: concurrent clients get exactly what they
would get alone, finish independently, free their slot on disconnect, share a prompt prefix,
hit the queue limit cleanly; a 200-request soak compiles nothing and leaks nothing; SIGTERM
finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import grokcli
from grokcli import paths

from server_helpers import ServerProcess, metric, wait_for_metric

WORDS = ("Once upon a time there was a little girl who loved the sea and every morning she walked down "
         "to the water with her dog and her brother Tom who was seven").split()


def prompt_of(i: int) -> str:
    """Sixteen different prompts of different lengths (2 to 28 words)."""
    start = i % 5
    return " ".join(WORDS[start:start + 2 + (i * 7) % 27])


def max_tokens_of(i: int) -> int:
    return (6, 40, 14, 28)[i % 4]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--max-queue", "8").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def demo():
    return grokcli.load(paths.demo_model_dir())


async def _complete(client: httpx.AsyncClient, prompt, max_tokens: int, **extra) -> tuple[dict, float]:
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **extra}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic()


def test_16_concurrent_clients_each_get_what_they_would_alone(server, demo):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            t0 = time.monotonic()
            results = await asyncio.wait_for(
                asyncio.gather(*(_complete(client, prompt_of(i), max_tokens_of(i)) for i in range(16))), 180)
            return t0, results

    t0, results = asyncio.run(main())
    model, tok = demo
    for i, (body, _) in enumerate(results):
        want = grokcli.generate(model, tok, prompt_of(i), temperature=0, max_tokens=max_tokens_of(i),
                                ignore_eos=True, continuation=True)
        assert body["choices"][0]["text"] == want.text, f"request {i} differs from the same request alone"
        assert body["usage"]["completion_tokens"] == max_tokens_of(i)
    # Mixed lengths finish independently: every 6-token request is back before any 40-token one.
    done_at = {i: t - t0 for i, (_, t) in enumerate(results)}
    shortest = [done_at[i] for i in range(16) if max_tokens_of(i) == 6]
    longest = [done_at[i] for i in range(16) if max_tokens_of(i) == 40]
    assert max(shortest) < min(longest)
    assert wait_for_metric(server.url, "grok_requests_running", 0) == 0


def test_a_shared_prefix_is_prefilled_once(server, demo):
    system = " ".join(WORDS * 2)  # a long shared "system prompt"

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            first, _ = await _complete(client, system + " and then", 8)
            second, _ = await _complete(client, system + " but one day", 8)
            return first, second

    before = metric(httpx.get(server.url + "/metrics").text, "grok_prompt_tokens_cached_total")
    first, second = asyncio.run(main())
    model, tok = demo
    shared = len(tok.encode(system))
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= shared - 2  # the whole system prompt, give or take the token at the seam
    after = metric(httpx.get(server.url + "/metrics").text, "grok_prompt_tokens_cached_total")
    assert after - before >= cached
    want = grokcli.generate(model, tok, system + " but one day", temperature=0, max_tokens=8, ignore_eos=True,
                            continuation=True)
    assert second["choices"][0]["text"] == want.text


def test_a_disconnect_frees_its_slot(server):
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    before = metric(httpx.get(server.url + "/metrics").text, "grok_sequences_finished_total",
                    'finish_reason="cancelled"')
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert metric(client.get("/metrics").text, "grok_requests_running") == 1
    t0 = time.monotonic()
    assert wait_for_metric(server.url, "grok_requests_running", 0, timeout=10) == 0
    freed_after = time.monotonic() - t0
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "grok_sequences_finished_total", 'finish_reason="cancelled"') == before + 1
    # Far fewer than the 400 tokens asked for were generated.
    assert freed_after < 10


def test_a_full_queue_answers_503_with_retry_after(server):
    async def one(client, i):
        r = await client.post("/v1/completions", json={"model": "demo", "prompt": prompt_of(i), "max_tokens": 60,
                                                       "temperature": 0, "ignore_eos": True})
        return r

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(40))), 180)

    responses = asyncio.run(main())
    busy = [r for r in responses if r.status_code == 503]
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) + len(busy) == 40
    assert len(ok) >= 16 + 8 and busy  # 16 slots + 8 queued were accepted, the rest refused
    assert all(r.headers.get("retry-after") == "1" and r.json()["error"]["code"] == "server_busy" for r in busy)
    assert wait_for_metric(server.url, "grok_requests_running", 0) == 0


@pytest.mark.slow
def test_soak_200_requests_no_compile_no_leak(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            sem = asyncio.Semaphore(8)

            async def one(i):
                async with sem:
                    stream = i % 3 == 0
                    body = {"model": "demo", "prompt": prompt_of(i), "max_tokens": 4 + i % 5, "temperature": i % 2,
                            "seed": i, "stream": stream, "logprobs": 2 if i % 4 == 0 else None}
                    r = await client.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 120)  # warm the HTTP side
            rss0 = metric((await client.get("/metrics")).text, "process_resident_memory_bytes")
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20, 220))), 300)
            return rss0

    rss0 = asyncio.run(main())
    assert wait_for_metric(server.url, "grok_requests_running", 0) == 0
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "grok_compiles_after_warmup") == 0
    assert metric(text, "grok_requests_waiting") == 0 and metric(text, "grok_kv_slots_in_use") == 0
    rss1 = metric(text, "process_resident_memory_bytes")
    assert rss0 > 0 and rss1 < rss0 * 1.05, f"RSS grew from {rss0 / 2**20:.0f} to {rss1 / 2**20:.0f} MiB"


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_and_exits_0():
    proc = ServerProcess().start()
    try:
        body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 80, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
            proc.proc.send_signal(__import__("signal").SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in rest[-2]
        assert proc.terminate() == 0
        assert "Traceback" not in "".join(proc.log)
        assert proc.stdout == []  # stdout is for model text only: the server writes nothing there
        with pytest.raises(httpx.TransportError):
            httpx.get(proc.url + "/health", timeout=5)
    finally:
        proc.stop()
