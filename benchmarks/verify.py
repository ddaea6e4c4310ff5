"""Hashing throughput of `grok verify-checkpoint` against `sha256sum`, same files, same run.

Writes a synthetic checkpoint of about --size-gb GB (Grok-1-shaped: a few large int8 MoE files per
layer, written by the project's writer) into a temp dir, records its manifest, then alternates
rounds of: verify_checkpoint with all cores, verify_checkpoint with one job, and `sha256sum` over
the same files. Prints GB/s per variant (median over rounds) and the ratios. The files sit in the
page cache after writing, so this measures the CPU side (hashing + parsing), which is what the
parallelism is for; from a cold disk both are bound by the disk.

    .venv/bin/python benchmarks/verify.py --size-gb 2 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np


def synthetic_checkpoint(root: Path, size_gb: float) -> Path:
    import sentencepiece as spm

    from grokcli.checkpoint import write_checkpoint
    from grokcli.config import ModelConfig
    from grokcli.params import LAYER_PARAMS, param_specs
    from grokcli.quant import QuantizedWeight

    probe = dict(vocab_size=64, pad_token=0, eos_token=2, sequence_len=128, embedding_multiplier_scale=1.0,
                 output_multiplier_scale=1.0, emb_size=2048, key_size=128, num_q_heads=16, num_kv_heads=4,
                 widening_factor=8, attn_output_multiplier=0.08, num_experts=8, num_selected_experts=2)
    per_layer = sum(np.prod(s.shape) for s in param_specs(ModelConfig(**probe, num_layers=1)) if s.layer == 0)
    cfg = ModelConfig(**probe, num_layers=max(1, round(size_gb * 1e9 / per_layer)))
    rng = np.random.default_rng(0)
    leaves = {}
    for spec in param_specs(cfg):
        if spec.quantized:  # random int8 is cheap to make and as hard to hash as real weights
            w = rng.integers(-128, 128, size=spec.shape, dtype=np.int8)
            leaves[(spec.name, spec.layer)] = QuantizedWeight(
                weight=w, scales=np.ones(spec.scales_shape, dtype=ml_dtypes.bfloat16))
        else:
            leaves[(spec.name, spec.layer)] = rng.standard_normal(spec.shape, dtype=np.float32)
    params = {"embed": leaves[("embed", None)], "final_norm": leaves[("final_norm", None)],
              "layers": [{n: leaves[(n, i)] for n in LAYER_PARAMS} for i in range(cfg.num_layers)]}
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(400)]
    tok = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=tok, vocab_size=cfg.vocab_size,
                                   model_type="bpe", minloglevel=2)
    (root / "tok.model").write_bytes(tok.getvalue())
    return write_checkpoint(root / "ckpt", params, cfg, tokenizer_path=root / "tok.model")


def float_scan_vs_sha256(rounds: int, mb: int = 256) -> None:
    """The NaN/Inf scan verify runs over float payloads (Grok-1: the 3.2 GB float32 embedding,
    norms, router, bf16 scales) against SHA-256 of the same bytes, one core, 1 MiB chunks."""
    import hashlib

    from grokcli.verify import CHUNK, _FiniteScan

    data = np.random.default_rng(0).standard_normal(mb << 18, dtype=np.float32).tobytes()
    view = memoryview(data)
    scan_s, sha_s = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        scan = _FiniteScan(3, len(data) - 3, "float32")  # an odd start: every chunk carries over
        for pos in range(0, len(data), CHUNK):
            scan.feed(pos, view[pos:pos + CHUNK])
        scan_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        h = hashlib.sha256()
        for pos in range(0, len(data), CHUNK):
            h.update(view[pos:pos + CHUNK])
        sha_s.append(time.perf_counter() - t)
    scan_t, sha_t = statistics.median(scan_s), statistics.median(sha_s)
    print(f"  float32 NaN/Inf scan {len(data) / scan_t / 1e9:.2f} GB/s, sha256 {len(data) / sha_t / 1e9:.2f} GB/s "
          f"(one core, {mb} MB): the scan adds {scan_t / sha_t:.2f}x the hashing time on float payloads only")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="synthetic checkpoint size (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temp dir)")
    args = ap.parse_args()
    if shutil.which("sha256sum") is None:
        sys.exit("sha256sum not found")

    from grokcli.verify import default_jobs, verify_checkpoint

    root = Path(tempfile.mkdtemp(prefix="grok-verify-bench-", dir=args.dir))
    try:
        t = time.perf_counter()
        ckpt = synthetic_checkpoint(root, args.size_gb)
        files = sorted(p for p in ckpt.rglob("*") if p.is_file())  # config.json is hashed too
        total = sum(p.stat().st_size for p in files)
        print(f"synthetic checkpoint: {len(files)} files, {total / 1e9:.2f} GB, largest "
              f"{max(p.stat().st_size for p in files) / 1e6:.0f} MB (written in {time.perf_counter() - t:.1f} s)")
        first = verify_checkpoint(ckpt, write_manifest_file=True)  # also warms the page cache
        assert first.ok, first.failures
        jobs = default_jobs()

        cpu: dict[str, list[float]] = {}  # GB per CPU-second: robust when other processes share the cores

        def run_verify(j: int) -> float:
            t0, c0 = time.perf_counter(), time.process_time()
            report = verify_checkpoint(ckpt, jobs=j)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            assert report.ok and report.integrity_proven and report.bytes_read == hashed_bytes, report.failures
            cpu.setdefault(f"verify --jobs {j}", []).append(report.bytes_read / dc / 1e9)
            return report.bytes_read / dt / 1e9

        hashed = [p for p in files if p.name != "manifest.json"]
        hashed_bytes = sum(p.stat().st_size for p in hashed)

        def run_sha256sum() -> float:
            t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(["sha256sum", *map(str, hashed)], check=True, stdout=subprocess.DEVNULL)
            dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.setdefault("sha256sum", []).append(
                hashed_bytes / (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / 1e9)
            return hashed_bytes / dt / 1e9

        variants = {f"verify --jobs {jobs}": lambda: run_verify(jobs), "verify --jobs 1": lambda: run_verify(1),
                    "sha256sum": run_sha256sum}
        results: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]  # alternate: the VM's cores are shared
            for name in order:
                results[name].append(variants[name]())
            print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1]:.2f} GB/s" for n in names))
        med = {n: statistics.median(v) for n, v in results.items()}
        print(f"\nmedian over {args.rounds} rounds ({hashed_bytes / 1e9:.2f} GB each, {jobs} cores):")
        for n in names:
            print(f"  {n:<18} {med[n]:6.2f} GB/s wall   {statistics.median(cpu[n]):6.2f} GB per CPU-second")
        base = med["sha256sum"]
        print(f"  ratio verify --jobs {jobs} / sha256sum: {med[f'verify --jobs {jobs}'] / base:.2f}x")
        print(f"  ratio verify --jobs 1 / sha256sum: {med['verify --jobs 1'] / base:.2f}x")
        per_core = statistics.median(cpu[f"verify --jobs {jobs}"]) / statistics.median(cpu["sha256sum"])
        print(f"  ratio per CPU-second, verify --jobs {jobs} / sha256sum: {per_core:.2f}x")
        float_scan_vs_sha256(args.rounds)
        print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
