"""Grok-1 at its real width: a 1-2 layer checkpoint with the release's shapes, load and decode.

Writes (once, under `--workdir`) a checkpoint of Grok-1's real shapes (emb 6144, 48/8 heads of 128,
8 experts of ffn 32768, vocab 131072, row blocks of 8) and `--layers` layers (1: ~8.1 GB, the
3.2 GB f32 embedding and three 1.6 GB expert files), leaf by leaf with bounded memory: random
int8 drawn as int8 (never a float copy of an expert leaf), one leaf in memory at a time. Then,
in one run:

- load: `grokcli.load` in a fresh process with the files' pages dropped (cold), against plain
  sequential reads of the same files (64 MiB `readinto` into one buffer), alternated; the loader's
  peak RSS against the checkpoint's bytes;
- decode at batch 1 and 8: tokens/s of grokcli with the kernel choice it makes on this machine
  (`quant.cpu_matmul_status()`), with the native kernel forced on (GROK_NATIVE_KERNELS=1), and with
  the XLA loops (=0), each with its own compiled steps on the same weights, and the roofline
  fraction (weight bytes read per token x tokens/s / read bandwidth measured in the same run).

    python benchmarks/fullwidth.py                 # 1 layer, batch 1 and 8
    python benchmarks/fullwidth.py --delete        # ... and delete the checkpoint afterwards

Needs ~8.5 GB of disk and ~9 GB of memory per layer (the weights, held once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402
from bench_load import drop_from_page_cache, plain_read  # noqa: E402

GROK1_WIDTH = dict(vocab=131072, emb=6144, key_size=128, q_heads=48, kv_heads=8, experts=8, selected=2,
                   widening=8.0, context=256)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=6, help="decoded tokens per run (full width is slow)")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds of each measurement")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--delete", action="store_true", help="delete the checkpoint at the end")
    ap.add_argument("--no-avx512", action="store_true", help="x86: measure the native kernel built with -mno-avx512f")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "grokcli-bench")
    return ap.parse_args(argv)


def config(layers: int):
    ns = argparse.Namespace(**GROK1_WIDTH, layers=layers)
    return bench_decode.make_config(ns)


def random_leaf(spec, rng):
    """One leaf in storage form, drawn in its own dtype: int8 weights with bf16 scales, f32 else."""
    import ml_dtypes

    from grokcli.quant import QuantizedWeight

    if spec.quantized:
        w = rng.integers(-127, 128, size=spec.shape, dtype=np.int8)  # int8 straight away
        fan_in = spec.shape[-2]
        s = np.full(spec.scales_shape, 1.0 / (127 * np.sqrt(fan_in) / np.sqrt(3)), np.float32)
        return QuantizedWeight(w, s.astype(ml_dtypes.bfloat16))
    x = rng.standard_normal(spec.shape, dtype=np.float32)  # float32 straight away, scaled in place
    if spec.name == "embed":
        x *= np.float32(3 / np.sqrt(spec.shape[-1]))
    elif spec.name == "router":
        x *= np.float32(4 / np.sqrt(spec.shape[0]))
    else:
        x *= np.float32(0.1)
        x += np.float32(1)
    return x


def write_fullwidth(cfg, out: Path) -> Path:
    """The checkpoint, leaf by leaf through the project's writer (`dump_leaf`), atomically per file."""
    from grokcli.checkpoint.writer import dump_leaf, expected_file_size
    from grokcli.fsutil import atomic_write, atomic_write_text
    from grokcli.layout import CONFIG_NAME, TENSOR_FOLDER, tensor_name
    from grokcli.params import param_specs

    if (out / "complete").is_file():
        return out
    specs = param_specs(cfg)
    need = sum(expected_file_size(s) for s in specs)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need * 1.05:
        sys.exit(f"error: {need / 1e9:.1f} GB needed under {out}, {free / 1e9:.1f} GB free")
    (out / TENSOR_FOLDER).mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        leaf = random_leaf(spec, rng)
        atomic_write(out / TENSOR_FOLDER / tensor_name(i), lambda f, leaf=leaf: dump_leaf(leaf, f))
        del leaf
    atomic_write_text(out / CONFIG_NAME, json.dumps(cfg.to_json(), indent=1) + "\n")
    (out / "complete").write_text("ok\n")
    print(f"wrote {need / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s to {out} (peak RSS of the writer "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)", file=sys.stderr)
    return out


_LOAD_CHILD = """
import json, resource, sys, time
import jax, grokcli
t0 = time.perf_counter()
model, _ = grokcli.load(sys.argv[1])
jax.block_until_ready(model.params)
print(json.dumps(dict(seconds=time.perf_counter() - t0,
                      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def measure_load(path: Path, rounds: int) -> dict:
    """Cold grokcli.load (fresh process, pages dropped) vs cold plain reads, alternated."""
    files = sorted(p for p in (path / "ckpt-0").iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    buf = memoryview(bytearray(64 << 20))
    base = subprocess.run([sys.executable, "-c", "import jax, grokcli, json, resource; print(json.dumps("
                           "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))"],
                          capture_output=True, text=True, check=True)
    import_rss = json.loads(base.stdout)
    loads, reads, rss = [], [], []
    for r in range(rounds):
        for variant in (("load", "read") if r % 2 == 0 else ("read", "load")):
            drop_from_page_cache(files)
            if variant == "read":
                t0 = time.perf_counter()
                plain_read(files, buf)
                reads.append(total / (time.perf_counter() - t0) / 1e9)
            else:
                done = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(path)], capture_output=True,
                                      text=True, check=True)
                res = json.loads(done.stdout.strip().splitlines()[-1])
                loads.append(total / res["seconds"] / 1e9)
                rss.append(res["peak_rss"])
        print(f"  load round {r + 1}: grokcli.load {loads[-1]:.2f} GB/s, plain reads {reads[-1]:.2f} GB/s, "
              f"peak RSS {rss[-1] / 1e9:.2f} GB", flush=True)
    return dict(bytes=total, load=statistics.median(loads), reads=statistics.median(reads), peak_rss=max(rss),
                import_rss=import_rss)


def with_env(value: str | None, fn):
    previous = os.environ.get("GROK_NATIVE_KERNELS")
    if value is None:
        os.environ.pop("GROK_NATIVE_KERNELS", None)
    else:
        os.environ["GROK_NATIVE_KERNELS"] = value
    try:
        return fn()
    finally:
        if previous is None:
            os.environ.pop("GROK_NATIVE_KERNELS", None)
        else:
            os.environ["GROK_NATIVE_KERNELS"] = previous


def main(argv=None) -> None:
    a = parse_args(argv)
    import jax

    cfg = config(a.layers)
    if a.no_avx512:
        bench_decode.use_avx2_build()
    out = a.workdir / f"fullwidth-{a.layers}l"
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"config: Grok-1 width (emb {cfg.emb_size}, heads {cfg.num_q_heads}/{cfg.num_kv_heads} of "
          f"{cfg.key_size}, {cfg.num_experts} experts of ffn {cfg.ffn_size}, vocab {cfg.vocab_size}), "
          f"{cfg.num_layers} layer(s)")
    path = write_fullwidth(cfg, out)
    try:
        if not a.skip_load:
            ld = measure_load(path, a.rounds)
            print(f"load (cold, median of {a.rounds}): grokcli.load {ld['load']:.2f} GB/s vs plain reads "
                  f"{ld['reads']:.2f} GB/s = {ld['load'] / ld['reads'] * 100:.0f}%; peak RSS "
                  f"{ld['peak_rss'] / 1e9:.2f} GB = {ld['peak_rss'] / ld['bytes']:.2f}x the checkpoint's "
                  f"{ld['bytes'] / 1e9:.2f} GB ({ld['import_rss'] / 1e9:.2f} GB of it is python + jax + grokcli "
                  f"before loading); load average {os.getloadavg()[0]:.1f}", flush=True)
        if not a.skip_decode:
            decode(a, path)
    finally:
        if a.delete:
            shutil.rmtree(out)
            print(f"deleted {out}")


def decode(a, path: Path) -> None:
    import jax

    import grokcli
    from grokcli import native, quant

    model, _ = grokcli.load(path)
    cfg = model.config
    print(f"cpu matmul: {quant.cpu_matmul_status()}\n  build flags: {' '.join(native.compile_flags())}")
    variants = {"chosen": (None, model)}
    if jax.default_backend() == "cpu":
        variants["native"] = ("1", dataclasses.replace(model, compiled={}))
        variants["xla loops"] = ("0", dataclasses.replace(model, compiled={}))
    rng = np.random.default_rng(1)
    for batch in [int(b) for b in a.batch.split(",")]:
        prompts = [[int(x) for x in rng.integers(3, cfg.vocab_size, a.prompt_len)] for _ in range(batch)]
        runs = {n: (lambda env=env, m=m: with_env(env, lambda: bench_decode.run_grokcli(m, prompts, a.new_tokens)))
                for n, (env, m) in variants.items()}
        for run in runs.values():
            run()  # compiles
        results = {n: [] for n in runs}
        bws = []
        for r in range(a.rounds):
            bws.append(max(bench_decode.measure_bandwidth(256).values()))
            for n in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                results[n].append(runs[n]())
        bw = statistics.median(bws)
        per_step, per_token = bench_decode.active_weight_bytes(model, batch)
        print(f"batch {batch} (median of {a.rounds}; read bandwidth {bw:.1f} GB/s, {per_step / 1e9:.2f} GB read per "
              f"step; load average {os.getloadavg()[0]:.1f}):")
        med = {n: {k: statistics.median(x[k] for x in v) for k in ("decode", "prefill")} for n, v in results.items()}
        for n, m in med.items():
            roof = per_token * m["decode"] / (bw * 1e9)
            print(f"  {n:<9} decode {m['decode']:6.2f} tok/s ({roof * 100:3.0f}% of roofline)  prefill "
                  f"{m['prefill']:6.1f} tok/s")
        if "xla loops" in med:
            print(f"  chosen / xla loops: decode {med['chosen']['decode'] / med['xla loops']['decode']:.2f}x, "
                  f"prefill {med['chosen']['prefill'] / med['xla loops']['prefill']:.2f}x; native / xla loops: "
                  f"decode {med['native']['decode'] / med['xla loops']['decode']:.2f}x, prefill "
                  f"{med['native']['prefill'] / med['xla loops']['prefill']:.2f}x", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
