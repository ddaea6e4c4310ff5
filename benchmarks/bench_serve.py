"""Continuous batching: aggregate tokens/s and time to first token at 1, 4 and 16 concurrent clients.

In one run, on the bench config (a random checkpoint written by the project's writer, as
bench_decode.py does), the same set of requests (random token-id prompts, greedy, a fixed number
of new tokens each) is served:

- one after another with `grokcli.generate` (the baseline: no server, one request at a time);
- by the server's engine (`grokcli.server.Engine`, `--parallel` slots) with 1, 4 and 16 client
  threads, each submitting its next request as soon as the last one finished.

Prints generated tokens/s (all requests together), TTFT p50/p95 (submit -> first token), and the
ratios against the baseline and against 1 client. HTTP is not part of the measurement (see
docs/server.md for the server's own overhead: one JSON line per token).

    python benchmarks/bench_serve.py                      # bench config, 32 requests
    python benchmarks/bench_serve.py --requests 16 --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import BENCH, checkpoint_for, make_config  # noqa: E402 - the shared bench config and writer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("vocab", "emb", "key_size", "q_heads", "kv_heads", "layers", "experts", "selected", "context"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=BENCH[name])
    ap.add_argument("--widening", type=float, default=BENCH["widening"])
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--parallel", type=int, default=16, help="engine KV slots")
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "grokcli-bench")
    return ap.parse_args(argv)


def cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    avx = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({avx}, {os.cpu_count()} CPUs)"


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_engine(engine, prompts, params, clients: int):
    """Serve every prompt with `clients` concurrent callers; returns (wall s, tokens, TTFTs)."""
    from grokcli.server.scheduler import DoneOut, TokenOut

    todo = list(range(len(prompts)))
    lock = threading.Lock()
    ttfts, tokens = [], [0]

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            t0 = time.perf_counter()
            first = None
            for event in engine.stream(prompts[i], params, timeout=600):
                if isinstance(event, TokenOut) and first is None:
                    first = time.perf_counter() - t0
                if isinstance(event, DoneOut):
                    with lock:
                        tokens[0] += len(event.token_ids)
                        ttfts.append(first)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, tokens[0], ttfts


def run_sequential(model, prompts, params):
    import grokcli

    ttfts, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        c = grokcli.generate(model, None, p, params)
        ttfts.append(c.stats.time_to_first_token_s)
        tokens += len(c.token_ids)
    return time.perf_counter() - t0, tokens, ttfts


def main(argv=None) -> None:
    a = parse_args(argv)
    import grokcli
    from grokcli.sampling_params import SamplingParams
    from grokcli.server import Engine, EngineConfig
    from grokcli.server.scheduler import compile_count

    cfg = make_config(a)
    path = checkpoint_for(cfg, a.workdir)
    model, _ = grokcli.load(path)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, cfg.vocab_size, a.prompt_len)] for _ in range(a.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    levels = [int(c) for c in a.clients.split(",")]

    t0 = time.perf_counter()
    engine = Engine(model, None, EngineConfig(parallel=a.parallel, prefill_chunk=a.prefill_chunk,
                                              max_queue=a.requests)).start()
    warm = time.perf_counter() - t0
    run_sequential(model, prompts[:1], params)  # compile generate's steps outside the timing
    run_engine(engine, prompts[:2], params, 2)

    print(f"CPU: {cpu_description()}; load average {os.getloadavg()[0]:.2f} at start", file=sys.stderr)
    print(f"bench config: emb {cfg.emb_size}, {cfg.num_layers} layers, {cfg.num_experts} experts, vocab "
          f"{cfg.vocab_size}; {a.requests} requests of {a.prompt_len} prompt tokens + {a.new_tokens} new; engine "
          f"{engine.slots} slots x {engine.context} positions, prefill chunk {engine.chunk}, one-row decode steps "
          f"while <= {engine.row_decode_max} rows decode (warm-up {warm:.1f} s)")
    results = {}
    wall, toks, ttft = run_sequential(model, prompts, params)
    results["sequential generate"] = (wall, toks, ttft)
    compiled = compile_count()
    for c in levels:
        results[f"engine, {c} client{'s' if c > 1 else ''}"] = run_engine(engine, prompts, params, c)
    compiles = compile_count() - compiled
    engine.close()

    base_rate = results["sequential generate"][1] / results["sequential generate"][0]
    one = results.get("engine, 1 client")
    one_rate = one[1] / one[0] if one else None
    one_p95 = percentile(one[2], 95) if one else None
    print(f"{'':24} {'tok/s':>8} {'x seq':>6} {'x 1cl':>6} {'TTFT p50':>9} {'p95':>8} {'p95 x 1cl':>9}")
    for name, (wall, toks, ttft) in results.items():
        rate = toks / wall
        p50, p95 = percentile(ttft, 50), percentile(ttft, 95)
        vs_one = f"{rate / one_rate:6.2f}" if one_rate else "     -"
        p95_vs = f"{p95 / one_p95:9.2f}" if one_p95 and name.startswith("engine") else "        -"
        print(f"{name:24} {rate:8.1f} {rate / base_rate:6.2f} {vs_one} {p50 * 1e3:7.1f}ms {p95 * 1e3:6.1f}ms {p95_vs}")
    print(f"compiles while the engine served: {compiles}; load average {os.getloadavg()[0]:.2f} at end", file=sys.stderr)


if __name__ == "__main__":
    main()
