"""Compile time of the prefill and decode steps against depth: 4, 16 and 64 layers, tiny width.

The layers run as one `lax.scan`, so compile time should not grow with `num_layers` (the issue
measured 17 s / 21 s / 81 s with the old unrolled loop on this project's CPU machine). Each depth
runs in a fresh process with the persistent compile cache off, and is compiled once: the time is
what grokcli's own status events report for compiling prefill + decode (one generation of a short
prompt). Prints seconds per depth and the 64/4 ratio (acceptance: <= 1.5x).

    python benchmarks/bench_compile.py [--layers 4 16 64] [--emb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

TINY = dict(vocab_size=256, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_experts=8,
            num_selected_experts=2, widening_factor=2, sequence_len=1024, pad_token=0, eos_token=2,
            embedding_multiplier_scale=8.0, output_multiplier_scale=0.5773502691896257, attn_output_multiplier=0.25)


def _child(layers: int, emb: int) -> dict:
    """In the fresh process: build a random model of `layers` layers and time its compiles."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import grokcli
    from grokcli.checkpoint import random_params
    from grokcli.config import ModelConfig
    from grokcli.loader import Model
    from grokcli.model import compute_dtype_for_backend
    from grokcli.quant import QuantizedWeight
    from grokcli.runtime import disable_compile_cache

    disable_compile_cache()
    cfg = ModelConfig(**{**TINY, "emb_size": emb, "num_layers": layers})

    def on_device(x):
        if isinstance(x, QuantizedWeight):  # as the loader places it: int8 weights, f32 scales
            return QuantizedWeight(jnp.asarray(x.weight), jnp.asarray(np.asarray(x.scales, np.float32)))
        return jnp.asarray(x)

    params = jax.tree.map(on_device, random_params(cfg, seed=0), is_leaf=lambda x: isinstance(x, QuantizedWeight))
    model = Model(config=cfg, params=params, dtype=compute_dtype_for_backend())
    seconds = {}
    t0 = time.perf_counter()
    for event in grokcli.stream_generate(model, None, list(range(3, 103)), temperature=0, max_tokens=4):
        if getattr(event, "kind", None) == "compiled":
            seconds[event.message.split(":")[0]] = event.seconds
    return {"layers": layers, "prefill_s": seconds.get("prefill"), "decode_s": seconds.get("decode"),
            "wall_s": time.perf_counter() - t0}


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = "AVX-512" if "avx512f" in info else "AVX2, no AVX-512" if "avx2" in info else "no AVX2"
    except (OSError, StopIteration):
        pass
    return f"{model} ({flags}), {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--emb", type=int, default=TINY["emb_size"])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.emb)))
        return

    import jax

    print(f"# bench_compile: {jax.default_backend()}, {cpu_description()}, "
          f"load average {os.getloadavg()[0]:.1f} at start", file=sys.stderr)
    rows = []
    for layers in args.layers:
        out = subprocess.run([sys.executable, __file__, "--child", str(layers), "--emb", str(args.emb)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"bench_compile: the {layers}-layer run failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["compile_s"] = (row["prefill_s"] or 0) + (row["decode_s"] or 0)
        rows.append(row)
        print(f"{layers:>4} layers: compile prefill {row['prefill_s']:.2f} s + decode {row['decode_s']:.2f} s "
              f"= {row['compile_s']:.2f} s  (whole generation {row['wall_s']:.2f} s)", flush=True)
    base, deep = rows[0], rows[-1]
    ratio = deep["compile_s"] / base["compile_s"]
    print(f"ratio {deep['layers']}/{base['layers']} layers: {ratio:.2f}x  (acceptance <= 1.5x: "
          f"{'met' if ratio <= 1.5 else 'NOT met'})")
    print(f"# load average {os.getloadavg()[0]:.1f} at end", file=sys.stderr)


if __name__ == "__main__":
    main()
