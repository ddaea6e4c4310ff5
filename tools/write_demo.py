"""Ship a trained demo model: write it in the official layout, measure it through grokcli, sample it.

Called by `tools/train_demo.py --write DEST`. Writes into DEST (normally grokcli/demo/):
`ckpt-0/`, `config.json`, `tokenizer.model` and, when DEST has a README.md (the model card),
`manifest.json`; into the work folder `metrics.json` (losses, sizes, samples) for the model card;
and the held-out test fixture tests/data/demo_heldout.txt.

Run directly (`write_demo.py DEST`) it only rewrites DEST's manifest.json, e.g. after editing
the model card.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "demo_heldout.txt"
FIXTURE_CHARS_PER_NOVEL = 1200  # whole paragraphs, about this many characters from each novel
SAMPLE_PROMPT = "Once upon a time"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def heldout_fixture(heldout_path: Path) -> str:
    """The first paragraphs (about FIXTURE_CHARS_PER_NOVEL characters) of each novel's held-out part."""
    parts = []
    for novel in heldout_path.read_text().strip("\n").split("\n\n"):
        taken, size = [], 0
        for para in novel.split("\n"):
            if size >= FIXTURE_CHARS_PER_NOVEL:
                break
            taken.append(para)
            size += len(para) + 1
        parts.append("\n".join(taken))
    return "\n\n".join(parts) + "\n"


def model_loss(model, ids: np.ndarray, seq: int, batch: int = 8) -> float:
    """Mean next-token loss (nats) of a grokcli Model over full windows of seq+1 tokens."""
    from train_demo import windows

    rows = windows(ids, seq + 1)
    total = 0.0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        if len(chunk) < batch:  # keep one compiled shape: pad the batch with repeated rows
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
        logits = model.logits(chunk[:, :-1])
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll = -np.take_along_axis(logp, chunk[:, 1:, None], axis=-1)[..., 0].mean(axis=1)
        total += float(nll[: len(rows[i:i + batch])].sum())
    return total / len(rows)


def write_manifest(dest: Path) -> Path:
    """manifest.json with the size and SHA-256 of every tensor, the tokenizer, the config and the model card.

    `grok verify-checkpoint` then proves the shipped files intact, and the model card is a
    listed file rather than an unexpected extra. Rerun after editing README.md:
    `.venv/bin/python tools/write_demo.py grokcli/demo`.
    """
    import hashlib

    from grokcli.config import load_config
    from grokcli.download import Manifest, ManifestEntry, write_manifest as write_manifest_file
    from grokcli.params import param_specs

    rels = [f"ckpt-0/tensor{i:05d}_000" for i in range(len(param_specs(load_config(dest))))]
    rels += ["tokenizer.model", "config.json", "README.md"]
    entries = tuple(ManifestEntry(rel, (dest / rel).stat().st_size,
                                  hashlib.sha256((dest / rel).read_bytes()).hexdigest(), None) for rel in rels)
    write_manifest_file(dest, Manifest(entries, origin="local"))
    return dest / "manifest.json"


def write(work: Path, dest: Path, cfg, tokenizer: Path, heldout_ids: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    import grokcli
    from grokcli.checkpoint.writer import write_checkpoint
    from train_demo import heldout_loss, load_params, make_eval

    from train_demo import STAGES

    records = [json.loads((work / f"train_log-{i}.json").read_text()) for i in range(1, len(STAGES) + 1)
               if (work / f"train_log-{i}.json").exists()]
    seq = STAGES[0].seq
    params = load_params(work / f"params-{len(records)}.npz", cfg)
    float_loss = heldout_loss(make_eval(cfg), jax.tree_util.tree_map(jnp.asarray, params), heldout_ids, seq)
    log(f"held-out loss, float32 training forward: {float_loss:.4f}")

    write_checkpoint(dest, params, cfg, tokenizer_path=tokenizer)
    # The writer's temp files are created 0600; a package's data must be readable by every user.
    for f in [*dest.glob("*"), *(dest / "ckpt-0").glob("*")]:
        f.chmod(0o755 if f.is_dir() else 0o644)
    if (dest / "README.md").exists():
        write_manifest(dest)
    ckpt_bytes = sum(f.stat().st_size for f in (dest / "ckpt-0").iterdir())
    total_bytes = ckpt_bytes + (dest / "tokenizer.model").stat().st_size + (dest / "config.json").stat().st_size
    log(f"wrote {dest}: checkpoint {ckpt_bytes / 1e6:.2f} MB, with tokenizer and config {total_bytes / 1e6:.2f} MB")

    model, tok = grokcli.load(dest)
    int8_loss = model_loss(model, heldout_ids, seq)
    log(f"held-out loss, int8 checkpoint through grokcli: {int8_loss:.4f} (perplexity {math.exp(int8_loss):.2f})")

    fixture = heldout_fixture(work / "heldout.txt")
    _atomic_text(FIXTURE, fixture)
    fixture_ids = np.asarray(tok.encode(fixture), np.int32)
    fixture_loss = model_loss(model, fixture_ids, 255, batch=len(fixture_ids) // 256)
    log(f"test fixture: {len(fixture)} chars, {len(fixture_ids)} tokens, loss {fixture_loss:.4f}")

    samples = {}
    for name, settings in {"greedy": dict(temperature=0.0),
                           "sampled (temperature 0.8, top-p 0.95, seed 0)": dict(temperature=0.8, top_p=0.95, seed=0),
                           "sampled (temperature 0.8, top-p 0.95, seed 1)": dict(temperature=0.8, top_p=0.95, seed=1)}.items():
        done = grokcli.generate(model, tok, SAMPLE_PROMPT, max_tokens=120, **settings)
        # Prompt and continuation decoded together, so the space between them is the model's.
        samples[name] = tok.decode(tok.encode(SAMPLE_PROMPT) + list(done.token_ids))
        log(f"{name}: {samples[name]}")

    metrics = {
        "heldout_tokens": int(len(heldout_ids)), "heldout_loss_float32": round(float_loss, 4),
        "heldout_loss_int8": round(int8_loss, 4), "heldout_perplexity_int8": round(math.exp(int8_loss), 2),
        "uniform_loss": round(math.log(cfg.vocab_size), 4), "fixture_loss_int8": round(fixture_loss, 4),
        "checkpoint_bytes": ckpt_bytes, "shipped_bytes": total_bytes,
        "parameters": int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params))),
        "training": [{k: r[k] for k in ("stage", "seed", "train", "seconds", "train_tokens", "final_train_loss",
                                        "final_heldout_loss", "jax", "devices")} for r in records],
        "samples": {"prompt": SAMPLE_PROMPT, "max_tokens": 120, **samples},
    }
    _atomic_text(work / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if len(sys.argv) != 2:
        sys.exit("usage: write_demo.py CHECKPOINT_DIR   (rewrites its manifest.json)")
    print(write_manifest(Path(sys.argv[1])))
