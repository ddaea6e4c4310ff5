"""The native int8 kernel alone against the XLA loops, per shape class, in GB/s of int8 read.

Builds the kernel as grokcli does and, on x86 with AVX2, also with -mno-avx512f (the AVX2 code that
AMD EPYC machines run), and times each against the XLA loops of grokcli/quant.py, alternated, best
of `--repeat`: a 6144x6144 matvec (row blocks of 8, the issue's standalone case), a 6144x1024
matvec (a key/value projection), decode gathers of 2 and 16 rows from a 48-expert stack of
1024x4096 experts (192 MiB, more than the caches), and a 128-row grouped prefill over 8 experts.

    python benchmarks/bench_kernel.py --repeat 8
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=8)
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from grokcli import native, quant

    builds = {"native": native.compile_flags()}
    if platform.machine().lower() in ("x86_64", "amd64") and "avx2" in native._cpu_flags():
        builds["native avx2"] = [f for f in builds["native"] if not f.startswith("-mprefer")] + ["-mno-avx512f"]
    for i, (name, flags) in enumerate(builds.items()):
        native.register(native.build(flags), f"grokcli_qmatmul_bench{i}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; builds: " + "; ".join(f"{n}: {' '.join(f)}" for n, f in builds.items()))

    def kernel(i):
        return jax.jit(lambda x, w, e: native.qmatmul_rows(x, w.weight, w.scales, e, target=f"grokcli_qmatmul_bench{i}"))

    rng = np.random.default_rng(0)

    def weight(e, k, m, blocks):
        return quant.QuantizedWeight(jnp.asarray(rng.integers(-127, 128, (e, k, m), dtype=np.int8)),
                                     jnp.full((e, blocks, m), 0.01, jnp.float32))

    def rows(n, k):
        return jnp.asarray(rng.standard_normal((n, k)), jnp.float32)

    def dense(x, w, e):
        return quant._dense(x, quant.QuantizedWeight(w.weight[0], w.scales[0]), jnp.float32)

    cases = {}
    for name, (k, m, blocks) in {"matvec 6144x6144": (6144, 6144, 8), "matvec 6144x1024": (6144, 1024, 1)}.items():
        w = weight(1, k, m, blocks)
        cases[name] = ([(rows(1, k), w, jnp.zeros((1,), jnp.int32))], dense, k * m)
    stack = weight(48, 1024, 4096, 1)
    for name, n, distinct in (("decode 2 rows", 2, 2), ("decode 16 rows", 16, 8)):
        x = rows(n, 1024)
        calls = [(x, stack, jnp.asarray((np.arange(n) // (n // distinct) + i * distinct) % 48, jnp.int32))
                 for i in range(48 // distinct)]
        cases[name] = (calls, lambda x, w, e: quant._gathered(x, w, e, jnp.float32), distinct * 1024 * 4096)
    eight = quant.QuantizedWeight(stack.weight[:8], stack.scales[:8])
    sizes = jnp.full((8,), 16, jnp.int32)
    cases["prefill 128 rows"] = ([(rows(128, 1024), eight, jnp.asarray(np.repeat(np.arange(8), 16), jnp.int32))],
                                 lambda x, w, e: quant._grouped(x, w, sizes, e, jnp.float32), 8 * 1024 * 4096)

    for name, (calls, xla, nbytes) in cases.items():
        fns = {"xla loops": jax.jit(xla), **{n: kernel(i) for i, n in enumerate(builds)}}
        best = {n: np.inf for n in fns}
        for fn in fns.values():
            fn(*calls[0]).block_until_ready()
        for r in range(a.repeat):
            for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                for args in calls:
                    t0 = time.perf_counter()
                    fns[n](*args).block_until_ready()
                    best[n] = min(best[n], time.perf_counter() - t0)
        rates = {n: nbytes / t / 1e9 for n, t in best.items()}
        print(f"{name:<18} " + "   ".join(f"{n} {v:6.2f} GB/s" for n, v in rates.items()) + "   ("
              + ", ".join(f"{n} {v / rates['xla loops']:.2f}x" for n, v in rates.items() if n != "xla loops")
              + " the XLA loops)", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
