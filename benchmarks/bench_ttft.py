"""Time to first token: long prompts in prefill chunks, and a REPL-style session with and without KV reuse.

Two parts, one run, printed as tables with ratios:

1. TTFT of 512-, 2048- and 8191-token prompts (one new token; 8191 fills Grok-1's 8192 context)
   with the default 512-token prefill chunks against the whole prompt in one prefill step (the
   former engine's shape: one compiled prefill per prompt length), warm: each measured after a
   run that compiled it, best of --repeat.
2. A --turns session: every turn appends --turn-tokens new tokens to the transcript and generates
   --new-tokens; (a) with a PromptCache (only the new text is prefilled), (b) without (the whole
   transcript every turn, as the REPL did). The session runs twice: the first pass counts jax
   backend compiles per turn (persistent-cache loads included), the second measures warm TTFT.

The model is a random checkpoint written by the project's writer: tiny width, Grok-1's
vocabulary-free shape (see --help for the config; --layers 64 gives Grok-1's depth). Say which
CPU a figure comes from: the header prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--emb", type=int, default=128)
    ap.add_argument("--key-size", type=int, default=32)
    ap.add_argument("--q-heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--prompts", default="512,2048,8191", help="prompt lengths of part 1")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--turn-tokens", type=int, default=150, help="tokens each turn adds")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per turn")
    ap.add_argument("--skip-prompts", action="store_true", help="only the session")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "grokcli-bench")
    return ap.parse_args(argv)


def cpu_description() -> str:
    model, flags = platform.processor() or "?", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flag_set = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
        flags = "AVX-512" if "avx512f" in flag_set else "AVX2, no AVX-512" if "avx2" in flag_set else "no AVX2"
    except (OSError, StopIteration):
        pass
    return f"{model} ({flags}), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"


class Compiles:
    """Counts jax backend compiles (persistent-cache loads included) while active."""

    def __enter__(self):
        import jax

        self.count = 0
        self._listener = lambda event, duration, **kw: self._on(event)
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def _on(self, event: str) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)


def make_model(a):
    import grokcli
    from grokcli.checkpoint import random_params, write_checkpoint
    from grokcli.config import ModelConfig

    cfg = ModelConfig(vocab_size=a.vocab, pad_token=0, eos_token=2, sequence_len=a.context,
                      embedding_multiplier_scale=78.38367176906169, output_multiplier_scale=0.5773502691896257,
                      emb_size=a.emb, key_size=a.key_size, num_q_heads=a.q_heads, num_kv_heads=a.kv_heads,
                      num_layers=a.layers, widening_factor=8, attn_output_multiplier=a.key_size ** -0.5,
                      num_experts=8, num_selected_experts=2)
    path = a.workdir / f"ttft-{a.layers}x{a.emb}-{a.vocab}-{a.context}"
    if not (path / "complete").is_file():
        write_checkpoint(path, random_params(cfg, seed=0), cfg)
        (path / "complete").write_text("ok\n")
    return grokcli.load(path)[0], cfg


def ttft(model, prompt, **kw) -> float:
    import grokcli

    out = grokcli.generate(model, None, prompt, temperature=0, ignore_eos=True, **kw)
    return out.stats.time_to_first_token_s


def part_prompts(model, a, rng) -> None:
    lengths = [int(x) for x in a.prompts.split(",")]
    print("\n1. time to first token by prompt length (warm: best of %d)" % a.repeat)
    print(f"{'prompt':>7} | {'512-token chunks':>17} | {'one prefill step':>17} | {'ratio':>6}")
    for n in lengths:
        prompt = rng.integers(3, a.vocab, n).tolist()
        times = {}
        for label, chunk in (("chunked", None), ("whole", n)):
            with Compiles() as compiles:
                first = ttft(model, prompt, max_tokens=1, prefill_chunk=chunk)
            runs = [ttft(model, prompt, max_tokens=1, prefill_chunk=chunk) for _ in range(a.repeat)]
            times[label] = min(runs if compiles.count else runs + [first])  # warm runs only
        print(f"{n:>7} | {times['chunked'] * 1e3:>14.1f} ms | {times['whole'] * 1e3:>14.1f} ms | "
              f"{times['chunked'] / times['whole']:>6.2f}")
    chunks = sorted({k for k in model.compiled if k[0] == "prefill" and k[2] == 512})
    print(f"prefill executables with 512-token chunks: {len(chunks)} (one per cache size: "
          f"{', '.join(str(k[3]) for k in chunks)}) for {len(lengths)} prompt lengths")


def session(model, a, turns: list[list[int]], variant: str) -> list[tuple[float, int, int, int]]:
    """(ttft, compiles, cached tokens, cache size) per turn of a session run as `variant`."""
    import grokcli
    from grokcli.request_shape import request_shape

    final = sum(len(t) for t in turns) + a.new_tokens * len(turns)
    cache = {"reuse": lambda: grokcli.PromptCache(), "reserved": lambda: grokcli.PromptCache(context=final),
             "none": lambda: None}[variant]()
    transcript: list[int] = []
    out = []
    for k, new in enumerate(turns):
        transcript += new
        with Compiles() as compiles:
            done = grokcli.generate(model, None, transcript, temperature=0.8, seed=k, max_tokens=a.new_tokens,
                                    ignore_eos=True, prompt_cache=cache)
        size = (cache.positions if cache is not None else
                request_shape(model.config, prompt_tokens=len(transcript), max_tokens=a.new_tokens).context)
        out.append((done.stats.time_to_first_token_s, compiles.count, done.stats.cached_tokens, size))
        transcript += list(done.token_ids)
    return out


VARIANTS = (("reuse", "reuse (cache grows)"), ("reserved", "reuse, one cache size"), ("none", "no reuse"))


def part_session(model, a, rng) -> None:
    turns = [rng.integers(3, a.vocab, a.turn_tokens).tolist() for _ in range(a.turns)]
    cold = {v: session(model, a, turns, v) for v, _ in VARIANTS}
    warm = {v: session(model, a, turns, v) for v, _ in VARIANTS}
    print(f"\n2. a {a.turns}-turn session, +{a.turn_tokens} tokens and {a.new_tokens} generated per turn "
          f"(TTFT warm, second pass; compiles counted in the first pass)")
    head = " | ".join(f"{label:>28}" for _, label in VARIANTS)
    print(f"{'turn':>4} | {head} | no reuse / reuse")
    for k in range(a.turns):
        cells = [f"{warm[v][k][0] * 1e3:>8.0f} ms, {cold[v][k][1]} comp, ctx {warm[v][k][3]:>4}" for v, _ in VARIANTS]
        print(f"{k + 1:>4} | " + " | ".join(f"{c:>28}" for c in cells)
              + f" | {warm['none'][k][0] / warm['reuse'][k][0]:>5.2f}")
    for v, label in VARIANTS:
        runs = warm[v]
        sizes = [t[3] for t in cold[v]]
        late = sum(cold[v][k][1] for k in range(1, a.turns) if sizes[k] == sizes[k - 1])
        first_here = next(k for k in range(a.turns) if sizes[k] == sizes[-1])
        print(f"{label}: turn {a.turns} / turn 1 TTFT {runs[-1][0] / runs[0][0]:.2f}; turn {a.turns} / turn "
              f"{first_here + 1} (first in its cache size) {runs[-1][0] / runs[first_here][0]:.2f}; compiles after "
              f"a cache size's first turn: {late}")


def main(argv=None) -> None:
    a = parse_args(argv)
    import jax

    from grokcli import quant

    a.workdir.mkdir(parents=True, exist_ok=True)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); {cpu_description()}")
    if jax.default_backend() == "cpu":
        print(f"cpu matmul: {quant.cpu_matmul_status()}")
    model, cfg = make_model(a)
    print(f"config: {cfg.num_layers} layers, emb {cfg.emb_size}, {cfg.num_q_heads}/{cfg.num_kv_heads} heads of "
          f"{cfg.key_size}, 8 experts (2 active), vocab {cfg.vocab_size}, context {cfg.sequence_len}; "
          f"activations {np.dtype(model.dtype).name}")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if not a.skip_prompts:
        part_prompts(model, a, rng)
    part_session(model, a, rng)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
