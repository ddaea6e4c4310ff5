"""Start-up costs of the `grok` command: `--help`, and time to first token with the compile cache.

Measures, in separate processes:

- `grok --help` wall time (and a bare `python -c pass` for scale);
- `grok complete` from process start to its first byte of text on stdout, for a first process
  with an empty compile cache (it compiles and writes the cache) and a second one with the cache
  the first left (it loads compiled code), in rounds, each round with a fresh cache directory
  (XDG_CACHE_HOME). Prints the times and the ratio second / first.

The model is the bench config (vocab set by the tokenizer) written once by the project's writer;
the tokenizer defaults to the shared Grok-1 tokenizer next to the repository.

    .venv/bin/python benchmarks/bench_startup.py --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "grok1" / "tokenizer.model",
                    help="SentencePiece model (default: ../shared/grok1/tokenizer.model)")
    ap.add_argument("--emb", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (first, second) processes (default 2)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "grokcli-bench")
    return ap.parse_args(argv)


def checkpoint(a) -> Path:
    import sentencepiece as spm

    from grokcli.checkpoint import random_params, write_checkpoint
    from grokcli.config import ModelConfig

    vocab = spm.SentencePieceProcessor(model_file=str(a.tokenizer)).vocab_size()
    cfg = ModelConfig(vocab_size=vocab, pad_token=0, eos_token=2, sequence_len=1024,
                      embedding_multiplier_scale=78.38367176906169, output_multiplier_scale=0.5773502691896257,
                      emb_size=a.emb, key_size=64, num_q_heads=8, num_kv_heads=2, num_layers=a.layers,
                      widening_factor=8, attn_output_multiplier=0.125, num_experts=8, num_selected_experts=2)
    tag = hashlib.sha256((json.dumps(cfg.to_json(), sort_keys=True) + str(a.tokenizer)).encode()).hexdigest()[:12]
    out = a.workdir / f"startup-{tag}"
    if not (out / "complete").is_file():
        write_checkpoint(out, random_params(cfg, seed=0), cfg, tokenizer_path=a.tokenizer)
        (out / "complete").write_text("ok\n")
    return out


def grok_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("grok")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from grokcli.cli import main; main()"]


def wall(cmd: list[str], env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def time_to_first_token(ckpt: Path, cache_home: Path) -> tuple[float, float, str]:
    """Seconds from process start to the first stdout byte, to exit, and the compile status lines."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("GROK_NO_COMPILE_CACHE", None)
    cmd = grok_cmd() + ["complete", "-c", str(ckpt), "--temp", "0", "-n", "8", "--ignore-eos",
                        "The weather today is"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise SystemExit(f"grok complete failed:\n{err}")
    t_exit = time.perf_counter() - t0
    status = "; ".join(line.strip() for line in err.splitlines() if "compiled" in line or "loaded compiled" in line)
    return (t_first if first else t_exit), t_exit, status


def main(argv=None) -> None:
    a = parse_args(argv)
    if not a.tokenizer.is_file():
        raise SystemExit(f"tokenizer not found: {a.tokenizer} (pass --tokenizer)")
    ckpt = checkpoint(a)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; checkpoint {ckpt}")

    helps, bare = [], []
    for _ in range(3):  # alternate with a bare interpreter start for scale
        helps.append(wall(grok_cmd() + ["--help"]))
        bare.append(wall([sys.executable, "-c", "pass"]))
    print(f"grok --help: {statistics.median(helps) * 1e3:.0f} ms (median of 3; python -c pass "
          f"{statistics.median(bare) * 1e3:.0f} ms)")

    firsts, seconds = [], []
    root = Path(tempfile.mkdtemp(prefix="grok-startup-"))
    try:
        for r in range(a.rounds):
            cache_home = root / f"round{r}"  # a fresh, empty compile cache for the first process
            f_first, f_exit, f_status = time_to_first_token(ckpt, cache_home)
            s_first, s_exit, s_status = time_to_first_token(ckpt, cache_home)
            firsts.append(f_first)
            seconds.append(s_first)
            print(f"round {r + 1}: first process {f_first:.2f} s to first token ({f_exit:.2f} s to exit) [{f_status}]")
            print(f"         second process {s_first:.2f} s to first token ({s_exit:.2f} s to exit) [{s_status}]")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    f, s = statistics.median(firsts), statistics.median(seconds)
    print(f"summary: grok --help {statistics.median(helps) * 1e3:.0f} ms; time to first token: first process "
          f"{f:.2f} s, second {s:.2f} s -> second/first {s / f:.2f}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
