"""Tensor-file parse and checkpoint read time: the schema parser against an earlier reader.

The baseline is `grokcli/checkpoint/unpickle.py` as it was at --baseline-rev (default: the last
commit before the schema parser, the restricted pure-Python unpickler), loaded from git into
this process, so both run in the same process on the same page-cache state. Alternating rounds:

CPU time of the process (all threads; less disturbed by a busy machine than wall time):

  header:  read_header() on every tensor file of the checkpoint(s) (unbuffered files, as the
           reader opens them), microseconds per file;
  bytes:   parse_header() on each file's bytes in memory, microseconds per file;
  load:    grokcli.checkpoint.read_checkpoint() of the bundled demo model (headers checked, then
           every payload read into its aligned array), with the reader's read_header/build_leaf
           taken from each implementation, milliseconds per load.

    .venv/bin/python benchmarks/bench_parse.py [--rounds 7] [--fixtures ../shared/fixtures]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "8c8ba7d"  # main before the schema parser landed


def load_baseline(rev: str):
    """The baseline unpickle module from git, importable with its relative imports."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:grokcli/checkpoint/unpickle.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_unpickle.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("grokcli.checkpoint._baseline_unpickle", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cpu_description() -> str:
    model, flags = platform.processor() or "?", ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l for l in info.splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    avx = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({avx}), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"


def time_headers(mod, files: list[Path], reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        for p in files:
            with open(p, "rb", buffering=0) as f:
                mod.read_header(f, p.name)
    return (time.process_time() - start) / (reps * len(files)) * 1e6


def time_bytes(mod, blobs: list[tuple[str, bytes]], reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        for name, data in blobs:
            mod.parse_header(data, name)
    return (time.process_time() - start) / (reps * len(blobs)) * 1e6


def time_load(mod, demo: Path, cfg) -> float:
    from grokcli.checkpoint import reader

    saved = reader.read_header, reader.build_leaf
    reader.read_header, reader.build_leaf = mod.read_header, mod.build_leaf
    try:
        start = time.process_time()
        reader.read_checkpoint(demo, cfg)
        return (time.process_time() - start) * 1e3
    finally:
        reader.read_header, reader.build_leaf = saved


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20, help="passes over the files per header round")
    ap.add_argument("--baseline-rev", default=DEFAULT_BASELINE)
    ap.add_argument("--fixtures", type=Path, default=REPO.parent / "shared" / "fixtures")
    a = ap.parse_args(argv)

    from grokcli.checkpoint import unpickle as new
    from grokcli.config import load_config
    from grokcli.paths import demo_model_dir

    old = load_baseline(a.baseline_rev)
    demo = demo_model_dir()
    files = sorted((demo / "ckpt-0").iterdir())
    if a.fixtures.is_dir():
        files += sorted(a.fixtures.glob("*/ckpt-0/tensor*"))
    blobs = [(p.name, p.read_bytes()) for p in files]
    cfg = load_config(demo)
    print(f"CPU: {cpu_description()}")
    print(f"{len(files)} tensor files (demo model{' + fixtures' if a.fixtures.is_dir() else ''}), "
          f"{sum(len(b) for _, b in blobs) / 1e6:.1f} MB; baseline {a.baseline_rev}")
    results = {(k, v): [] for k in ("header", "bytes", "load") for v in ("baseline", "schema")}
    for mod in (old, new):  # warm up both
        time_headers(mod, files, 1), time_bytes(mod, blobs, 1), time_load(mod, demo, cfg)
    for r in range(a.rounds):
        for label, mod in (("baseline", old), ("schema", new)) if r % 2 == 0 else (("schema", new), ("baseline", old)):
            results["header", label].append(time_headers(mod, files, a.reps))
            results["bytes", label].append(time_bytes(mod, blobs, a.reps))
            results["load", label].append(time_load(mod, demo, cfg))
    units = {"header": "us/file", "bytes": "us/file", "load": "ms CPU (demo read_checkpoint)"}
    for k in ("header", "bytes", "load"):
        b, s = (statistics.median(results[k, v]) for v in ("baseline", "schema"))
        print(f"{k:6s} median of {a.rounds}: baseline {b:8.1f}  schema {s:8.1f} {units[k]}   "
              f"schema/baseline {s / b:.2f}x time")


if __name__ == "__main__":
    main()
