"""Checkpoint load throughput of `grokcli.load` against plain sequential reads of the same files.

Writes a synthetic checkpoint of at least --size-gb GB once (Grok-1-shaped layers, random int8
weights, written by the project's writer) into --workdir and reuses it. Then alternates, per
round: `grokcli.load(path)` until every array is on the device, and a plain sequential read of
the same files (one thread, `readinto` a reused 64 MiB buffer, like `cat`); for context also
the same reads into new arrays, one per file (what any loader that keeps the weights in its own
memory pays at least: first-touch page faults) and grokcli.load with numpy's transparent-huge-page
request turned off (4K pages). All variants see
the same page-cache state: "warm" (the files cached in RAM, which measures the CPU side) and,
with --cold, "cold" (each file's pages dropped with posix_fadvise(DONTNEED) before each variant,
so both read from the disk). Prints GB/s per variant and the ratio load / plain reads.

    .venv/bin/python benchmarks/bench_load.py --size-gb 2 --rounds 3 --cold
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size, at least (default 2)")
    ap.add_argument("--emb", type=int, default=2048, help="emb_size of the synthetic model (default 2048)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per cache state (default 3)")
    ap.add_argument("--cold", action="store_true", help="also measure with the files' pages dropped first")
    ap.add_argument("--workers", type=int, default=None, help="grokcli.load reader threads (default: its own)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "grokcli-bench",
                    help="where the checkpoint is written once and reused")
    return ap.parse_args(argv)


def synthetic_checkpoint(workdir: Path, size_gb: float, emb: int) -> Path:
    """A checkpoint of >= size_gb GB: as many Grok-1-shaped layers of width `emb` as it takes."""
    import ml_dtypes

    from grokcli.checkpoint import write_checkpoint
    from grokcli.config import ModelConfig
    from grokcli.params import assemble, param_specs
    from grokcli.quant import QuantizedWeight

    base = dict(vocab_size=1024, pad_token=0, eos_token=2, sequence_len=512, embedding_multiplier_scale=1.0,
                output_multiplier_scale=1.0, emb_size=emb, key_size=128, num_q_heads=emb // 128,
                num_kv_heads=max(1, emb // 512), widening_factor=8, attn_output_multiplier=0.08,
                num_experts=8, num_selected_experts=2)
    per_layer = sum(int(np.prod(s.shape)) for s in param_specs(ModelConfig(**base, num_layers=1)) if s.layer == 0)
    layers = max(1, -(-int(size_gb * 1e9) // per_layer))
    cfg = ModelConfig(**base, num_layers=layers)
    tag = hashlib.sha256(json.dumps(cfg.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    out = workdir / f"load-{tag}"
    if (out / "complete").is_file():
        return out
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    leaves = {}
    for spec in param_specs(cfg):
        if spec.quantized:  # random int8 bytes: as costly to read as real weights, quick to make
            leaves[(spec.name, spec.layer)] = QuantizedWeight(
                rng.integers(-127, 128, size=spec.shape, dtype=np.int8),
                np.full(spec.scales_shape, 0.01, ml_dtypes.bfloat16))
        else:
            leaves[(spec.name, spec.layer)] = rng.standard_normal(spec.shape, dtype=np.float32)
    write_checkpoint(out, assemble(cfg, leaves), cfg)
    del leaves
    (out / "complete").write_text("ok\n")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def drop_from_page_cache(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(files: list[Path], buf: memoryview) -> int:
    """Read every file start to end into one reused buffer; returns the bytes read."""
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def fresh_reads(files: list[Path], chunk: int = 64 << 20) -> int:
    """Read every file, one thread, with the same 64 MiB `readinto` calls, into a new array of its own.

    Plain reads plus the first touch of new memory, and nothing else: the least any loader that
    keeps the weights in its own memory pays, with numpy's allocator (huge pages) like grokcli's.
    """
    arrays = []
    for p in files:
        arr = np.empty(p.stat().st_size, np.uint8)
        view = memoryview(arr)
        with open(p, "rb", buffering=0) as f:
            done = 0
            while done < arr.nbytes and (n := f.readinto(view[done:done + chunk])):
                done += n
        arrays.append(arr)
    total = sum(a.nbytes for a in arrays)
    del arrays
    gc.collect()
    return total


def grokcli_load(path: Path, workers: int | None, hugepages: bool = True) -> None:
    import jax

    import grokcli

    # numpy asks for transparent huge pages on large arrays; on some VMs first-touch faults on
    # them are several times slower (compaction). The "4K pages" variant measures that effect.
    set_huge = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    previous = set_huge(hugepages) if set_huge else None
    try:
        model, _ = grokcli.load(path, workers=workers)
        jax.block_until_ready(model.params)  # every array on the device
    finally:
        if set_huge:
            set_huge(previous)
    del model
    gc.collect()


def main(argv=None) -> None:
    a = parse_args(argv)
    import jax

    path = synthetic_checkpoint(a.workdir, a.size_gb, a.emb)
    files = sorted((path / "ckpt-0").iterdir())
    total = sum(p.stat().st_size for p in files)
    print(f"checkpoint {path}: {len(files)} files, {total / 1e9:.2f} GB, largest "
          f"{max(p.stat().st_size for p in files) / 1e6:.0f} MB; backend {jax.default_backend()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    buf = memoryview(bytearray(64 << 20))
    grokcli_load(path, a.workers)  # warm-up: imports, the first device allocations; files into the page cache
    plain_read(files, buf)

    variants = {"grokcli.load": lambda: grokcli_load(path, a.workers),
                "plain reads": lambda: plain_read(files, buf),
                "fresh-memory reads": lambda: fresh_reads(files),
                "grokcli.load 4K pages": lambda: grokcli_load(path, a.workers, hugepages=False)}
    states = ["warm"] + (["cold"] if a.cold else [])
    ratios = {}
    for state in states:
        results = {n: [] for n in variants}
        names = list(variants)
        for r in range(a.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):  # alternate: the vCPUs are shared
                if state == "cold":
                    drop_from_page_cache(files)
                else:
                    plain_read(files, buf)  # make sure every page is cached
                t0 = time.perf_counter()
                variants[name]()
                results[name].append(total / (time.perf_counter() - t0) / 1e9)
            print(f"{state} round {r + 1}: " + ", ".join(f"{n} {results[n][-1]:.2f} GB/s" for n in names))
        med = {n: statistics.median(v) for n, v in results.items()}
        ratios[state] = med["grokcli.load"] / med["plain reads"]
        print(f"  {state} page cache, median of {a.rounds}: " + ", ".join(f"{n} {med[n]:.2f} GB/s" for n in names))
        print(f"    grokcli.load / plain reads {ratios[state] * 100:.0f}%, "
              f"grokcli.load / fresh-memory reads {med['grokcli.load'] / med['fresh-memory reads'] * 100:.0f}%, "
              f"with 4K pages / plain reads {med['grokcli.load 4K pages'] / med['plain reads'] * 100:.0f}%")
    print("summary: " + ", ".join(f"{s} {ratios[s] * 100:.0f}% of plain sequential reads" for s in states)
          + f"; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
