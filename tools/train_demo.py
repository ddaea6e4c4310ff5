"""Train grokcli's bundled demo model: a small Grok-1-architecture MoE on Jane Austen's novels.

    .venv/bin/python tools/train_demo.py --out /tmp/demo-train            # fetches the corpus
    .venv/bin/python tools/train_demo.py --out /tmp/demo-train --corpus-deb r-cran-janeaustenr_1.0.0-1_all.deb
    .venv/bin/python tools/train_demo.py --out /tmp/demo-train --write grokcli/demo   # ship it

Steps (each result is kept in --out, so a rerun resumes at the first missing one):
1. corpus: Debian `r-cran-janeaustenr` 1.0.0-1 (see tools/austen_corpus.py), re-flowed into one
   paragraph per line; the last 4% of each novel's paragraphs are held out.
2. tokenizer: SentencePiece BPE (vocab 4096, byte fallback) with Grok-1's special ids
   ([PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3) and a newline piece.
3. model: the reference forward (tools-only float32 copy, every expert computed densely and
   combined with the un-renormalised top-k gates, which is the same function as the sparse one),
   trained with a hand-written AdamW in the stages of STAGES (each starting from the previous
   stage's weights); everything seeded.
4. --write: int8 quantisation and the official checkpoint layout through grokcli's writer, plus
   the held-out loss of the written int8 model measured through grokcli's own forward.

Dependencies: only grokcli's own (jax, numpy, sentencepiece, ml_dtypes) and Debian's apt/dpkg.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import austen_corpus  # noqa: E402

from grokcli.config import ModelConfig  # noqa: E402
from grokcli.params import LAYER_PARAMS  # noqa: E402

SEED = 20240317  # Grok-1's open-weights release date
HELDOUT_FRACTION = 0.04
VOCAB = 4096

# The demo model. Multipliers follow Grok-1's rules: embeddings times sqrt(emb_size), attention
# scores times 1/sqrt(key_size), logits times 1/sqrt(3) (Grok-1: 78.38 = sqrt(6144), 1/sqrt(128)).
EMB = 256
KEY = 64
DEMO = ModelConfig(
    vocab_size=VOCAB, pad_token=0, eos_token=2, sequence_len=512,
    embedding_multiplier_scale=math.sqrt(EMB), output_multiplier_scale=0.5773502691896257,
    emb_size=EMB, key_size=KEY, num_q_heads=4, num_kv_heads=2, num_layers=4,
    widening_factor=2.0, attn_output_multiplier=1 / math.sqrt(KEY),
    num_experts=4, num_selected_experts=2,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (recorded in the model card)."""

    steps: int = 400  # optimizer steps
    batch: int = 4  # sequences per step
    seq: int = 512  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    warmup: int = 40  # linear warm-up steps
    final_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 0.1  # AdamW decay of matrices (not embeddings, norms, router)
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # global gradient-norm clip
    balance: float = 0.01  # Switch-style load-balancing loss weight (keeps all experts in use)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# The shipped run: 400 steps from scratch, then 300 more at a lower peak rate (the second stage
# was added when the first turned out to have seen less than one epoch in the time budget).
STAGES = (
    TrainConfig(),
    TrainConfig(steps=300, lr=1e-3, warmup=20),
)


# ---------------------------------------------------------------------------------------------
# 1. corpus


def prepare_corpus(out: Path, deb: Path | None) -> tuple[Path, Path]:
    """train.txt / heldout.txt in `out`: one paragraph per line, novels separated by a blank line."""
    train_path, heldout_path = out / "train.txt", out / "heldout.txt"
    if train_path.exists() and heldout_path.exists():
        return train_path, heldout_path
    novels = austen_corpus.load(deb)
    train, heldout = [], []
    for name, paras in novels.items():
        cut = len(paras) - max(1, round(len(paras) * HELDOUT_FRACTION))
        train.append("\n".join(paras[:cut]))
        heldout.append("\n".join(paras[cut:]))
        log(f"corpus: {name}: {cut} train / {len(paras) - cut} held-out paragraphs")
    train_path.write_text("\n\n".join(train) + "\n")
    heldout_path.write_text("\n\n".join(heldout) + "\n")
    return train_path, heldout_path


# ---------------------------------------------------------------------------------------------
# 2. tokenizer


def train_tokenizer(out: Path, train_path: Path) -> Path:
    """A SentencePiece BPE model with Grok-1's special ids, trained on the training split."""
    import sentencepiece as spm

    model_path = out / "tokenizer.model"
    if model_path.exists():
        return model_path
    _spm_train(spm, out, train_path)
    return model_path


def _spm_train(spm, out: Path, train_path: Path) -> None:
    spm.set_random_generator_seed(SEED)
    # SentencePiece reads its input line by line; paragraphs are the "sentences", and the
    # newline between them is the user-defined piece "\n" in the encoded stream.
    # Relative paths, run from the work folder: the model file records its trainer's arguments,
    # and a shipped file should not carry this machine's paths.
    cwd = os.getcwd()
    os.chdir(out)
    try:
        _spm_train_here(spm, train_path.name)
    finally:
        os.chdir(cwd)


def _spm_train_here(spm, train_name: str) -> None:
    spm.SentencePieceTrainer.train(
        input=train_name, model_prefix="tokenizer", model_type="bpe",
        vocab_size=VOCAB, character_coverage=1.0, byte_fallback=True,
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[BOS]", eos_id=2, eos_piece="[EOS]",
        unk_id=3, unk_piece="[UNK]", user_defined_symbols=["\n"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
    )


def encode_split(tokenizer: Path, text_path: Path) -> np.ndarray:
    """The split as one int32 token stream; each novel ends with EOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids: list[int] = []
    for novel in text_path.read_text().strip("\n").split("\n\n"):
        ids.extend(sp.encode(novel))
        ids.append(DEMO.eos_token)
    return np.asarray(ids, np.int32)


# ---------------------------------------------------------------------------------------------
# 3. model: a float32 copy of the reference forward, for training


def init_params(cfg: ModelConfig, key) -> dict:
    """Float32 params in grokcli's pytree layout (see grokcli/params.py)."""
    import jax
    import jax.numpy as jnp

    def normal(key, shape, fan_in):
        return jax.random.truncated_normal(key, -2, 2, shape, jnp.float32) / math.sqrt(fan_in)

    keys = iter(jax.random.split(key, 1 + 8 * cfg.num_layers))
    # Embedding rows of RMS 1/sqrt(emb): times sqrt(emb) the residual stream starts at RMS 1.
    params = {"embed": normal(next(keys), (cfg.vocab_size, cfg.emb_size), cfg.emb_size),
              "final_norm": jnp.ones((cfg.emb_size,), jnp.float32), "layers": []}
    for _ in range(cfg.num_layers):
        layer = {}
        for name, (_, _, shape_fn, _, _, _) in LAYER_PARAMS.items():
            shape = tuple(shape_fn(cfg))
            if name.endswith("norm"):
                layer[name] = jnp.ones(shape, jnp.float32)
            elif name == "router":
                layer[name] = jnp.zeros(shape, jnp.float32)  # uniform routing at the start
            else:
                layer[name] = normal(next(keys), shape, shape[-2])
        params["layers"].append(layer)
    return params


def _rms_norm(x, scale):
    import jax
    import jax.numpy as jnp

    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale


def _rope(x, positions):
    import jax.numpy as jnp

    dim = x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    phase = positions[:, None].astype(jnp.float32) * inv_freq
    phase = jnp.concatenate([phase, phase], axis=-1)[None, :, None, :]  # [1, T, 1, dim]
    first, second = jnp.split(x, 2, axis=-1)
    return x * jnp.cos(phase) + jnp.concatenate([-second, first], axis=-1) * jnp.sin(phase)


def train_forward(params, tokens, cfg: ModelConfig):
    """Logits `[B, T, vocab]` and the mean load-balancing loss of the reference forward."""
    import jax
    import jax.numpy as jnp

    b, t = tokens.shape
    positions = jnp.arange(t)
    causal = positions[None, :] <= positions[:, None]  # [T(query), S(key)]
    key_ok = (tokens != cfg.pad_token)[:, None, None, None, :]
    mask = causal[None, None, None] & key_ok  # [B, kv, group, T, S]
    h = params["embed"][tokens] * cfg.embedding_multiplier_scale
    balance = 0.0
    for p in params["layers"]:
        x = _rms_norm(h, p["attn_norm"])
        q = (x @ p["q"]).reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.key_size)
        k = (x @ p["k"]).reshape(b, t, cfg.num_kv_heads, cfg.key_size)
        v = (x @ p["v"]).reshape(b, t, cfg.num_kv_heads, cfg.key_size)
        q = _rope(q.reshape(b, t, cfg.num_q_heads, cfg.key_size), positions).reshape(q.shape)
        k = _rope(k, positions)
        s = jnp.einsum("btkgd,bskd->bkgts", q, k) * cfg.attn_output_multiplier
        s = jnp.where(mask, 30.0 * jnp.tanh(s / 30.0), -1e30)
        o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v)
        h = h + _rms_norm(o.reshape(b, t, -1) @ p["o"], p["attn_post_norm"])

        x = _rms_norm(h, p["moe_norm"])
        probs = jax.nn.softmax(x @ p["router"], axis=-1)  # [B, T, E]
        top, chosen = jax.lax.top_k(probs, cfg.num_selected_experts)
        # Dense combination: each expert's weight is its probability if selected, else 0.
        gates = jnp.sum(jax.nn.one_hot(chosen, cfg.num_experts) * top[..., None], axis=-2)
        hidden = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, p["w_gate"]), approximate=True)
        hidden = hidden * jnp.einsum("btd,edf->btef", x, p["w_up"])
        y = jnp.einsum("btef,efd,bte->btd", hidden, p["w_down"], gates)
        h = h + _rms_norm(y, p["moe_post_norm"])
        # Switch Transformer balance loss: E * sum_e (fraction routed to e) * (mean prob of e).
        routed = jnp.mean(jax.nn.one_hot(chosen, cfg.num_experts).sum(-2), axis=(0, 1)) / cfg.num_selected_experts
        balance = balance + cfg.num_experts * jnp.sum(routed * jnp.mean(probs, axis=(0, 1)))
    h = _rms_norm(h, params["final_norm"])
    logits = (h @ params["embed"].T) * cfg.output_multiplier_scale
    return logits, balance / cfg.num_layers


def token_loss(logits, targets):
    """Mean next-token cross-entropy (nats)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def _decays(params) -> dict:
    """Which leaves get weight decay: the 7 matrices of each layer."""
    import jax

    def flag(path, _):
        name = getattr(path[-1], "key", None)
        return name in ("q", "k", "v", "o", "w_gate", "w_up", "w_down")

    return jax.tree_util.tree_map_with_path(flag, params)


def make_step(cfg: ModelConfig, tc: TrainConfig):
    """The jitted AdamW step: (params, m, v, step, batch) -> (params, m, v, loss, balance)."""
    import jax
    import jax.numpy as jnp

    def loss_fn(params, batch):
        logits, balance = train_forward(params, batch[:, :-1], cfg)
        ce = token_loss(logits, batch[:, 1:])
        return ce + tc.balance * balance, (ce, balance)

    def lr_at(step):
        warm = (step + 1) / tc.warmup
        progress = jnp.clip((step - tc.warmup) / max(1, tc.steps - tc.warmup), 0, 1)
        cosine = tc.final_lr_fraction + (1 - tc.final_lr_fraction) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return tc.lr * jnp.where(step < tc.warmup, warm, cosine)

    decays = None

    @jax.jit
    def step_fn(params, m, v, step, batch):
        nonlocal decays
        grads, (ce, balance) = jax.grad(loss_fn, has_aux=True)(params, batch)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
        grads = jax.tree_util.tree_map(lambda g: g * jnp.minimum(1.0, tc.clip / (norm + 1e-6)), grads)
        m = jax.tree_util.tree_map(lambda m, g: tc.beta1 * m + (1 - tc.beta1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: tc.beta2 * v + (1 - tc.beta2) * g * g, v, grads)
        t = step + 1
        lr = lr_at(step)
        c1, c2 = 1 - tc.beta1 ** t, 1 - tc.beta2 ** t

        def update(p, m, v, decay):
            upd = (m / c1) / (jnp.sqrt(v / c2) + 1e-8)
            return p - lr * (upd + (tc.weight_decay * p if decay else 0.0))

        params = jax.tree_util.tree_map(update, params, m, v, _decays(params))
        return params, m, v, ce, balance

    return step_fn


def make_eval(cfg: ModelConfig):
    import jax

    @jax.jit
    def eval_fn(params, batch):
        logits, _ = train_forward(params, batch[:, :-1], cfg)
        return token_loss(logits, batch[:, 1:])

    return eval_fn


def windows(stream: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows of `length` tokens covering the stream (the tail is dropped)."""
    n = len(stream) // length
    return stream[: n * length].reshape(n, length)


def heldout_loss(eval_fn, params, heldout: np.ndarray, seq: int, batch: int = 8) -> float:
    """Mean next-token loss over all full held-out windows of seq+1 tokens."""
    rows = windows(heldout, seq + 1)
    losses = [float(eval_fn(params, rows[i:i + batch])) * len(rows[i:i + batch])
              for i in range(0, len(rows), batch)]
    return sum(losses) / len(rows)


def save_params(path: Path, params) -> None:
    """Float params as .npz (flat names), written atomically."""
    import jax

    flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path_): np.asarray(leaf)
            for path_, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def load_params(path: Path, cfg: ModelConfig) -> dict:
    data = np.load(path)
    return {"embed": data["embed"], "final_norm": data["final_norm"],
            "layers": [{name: data[f"layers/{i}/{name}"] for name in LAYER_PARAMS}
                       for i in range(cfg.num_layers)]}


def train(out: Path, train_ids: np.ndarray, heldout_ids: np.ndarray, tc: TrainConfig,
          cfg: ModelConfig, stage: int = 1, init: dict | None = None) -> dict:
    """Runs the optimisation; returns the training record (also saved as train_log.json)."""
    import jax
    import jax.numpy as jnp

    params = init_params(cfg, jax.random.PRNGKey(SEED)) if init is None else jax.tree_util.tree_map(jnp.asarray, init)
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    step_fn, eval_fn = make_step(cfg, tc), make_eval(cfg)
    rng = np.random.default_rng(SEED + stage - 1)  # each stage its own stream of batches
    window = tc.seq + 1
    history = []
    start = time.perf_counter()
    for step in range(tc.steps):
        # Random windows of the training stream (uniform start positions).
        starts = rng.integers(0, len(train_ids) - window, size=tc.batch)
        batch = jnp.asarray(np.stack([train_ids[s:s + window] for s in starts]))
        params, m, v, ce, balance = step_fn(params, m, v, jnp.int32(step), batch)
        if step % 50 == 0 or step == tc.steps - 1:
            ce, balance = float(ce), float(balance)
            elapsed = time.perf_counter() - start
            entry = {"step": step, "train_loss": ce, "balance": balance, "seconds": round(elapsed, 1)}
            if step % 200 == 0 or step == tc.steps - 1:
                entry["heldout_loss"] = heldout_loss(eval_fn, params, heldout_ids, tc.seq)
            history.append(entry)
            tok_s = (step + 1) * tc.batch * tc.seq / max(elapsed, 1e-9)
            log(f"step {step}: train {ce:.3f} balance {balance:.3f} "
                + (f"held-out {entry['heldout_loss']:.3f} " if "heldout_loss" in entry else "")
                + f"({elapsed:.0f} s, {tok_s:.0f} tok/s)")
        if step % 100 == 99:
            save_params(out / f"params-{stage}.npz", params)
    seconds = time.perf_counter() - start
    save_params(out / f"params-{stage}.npz", params)
    record = {"stage": stage, "seed": SEED + stage - 1, "train": dataclasses.asdict(tc), "seconds": round(seconds, 1),
              "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(heldout_ids)),
              "final_train_loss": history[-1]["train_loss"],
              "final_heldout_loss": history[-1]["heldout_loss"], "history": history,
              "jax": jax.__version__, "devices": str(jax.devices())}
    (out / f"train_log-{stage}.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (corpus, tokenizer, params)")
    ap.add_argument("--corpus-deb", type=Path, help=f"a downloaded {austen_corpus.PACKAGE} .deb (default: apt-get download)")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps and exit")
    ap.add_argument("--write", type=Path, help="write the trained model as a checkpoint folder here")
    ap.add_argument("--write-only", action="store_true", help="write the latest params saved in --out, train no further")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    train_path, heldout_path = prepare_corpus(args.out, args.corpus_deb)
    tokenizer = train_tokenizer(args.out, train_path)
    train_ids, heldout_ids = encode_split(tokenizer, train_path), encode_split(tokenizer, heldout_path)
    log(f"tokens: {len(train_ids)} train, {len(heldout_ids)} held-out "
        f"({train_path.stat().st_size / len(train_ids):.2f} bytes/token)")

    if args.bench:
        bench(train_ids, STAGES[0], args.bench)
        return 0
    if not args.write_only:
        # Stage s starts from stage s-1's weights with fresh AdamW moments; finished stages are kept.
        init = None
        for stage, tc in enumerate(STAGES, start=1):
            if not (args.out / f"train_log-{stage}.json").exists():
                train(args.out, train_ids, heldout_ids, tc, DEMO, stage=stage, init=init)
            init = load_params(args.out / f"params-{stage}.npz", DEMO)
    if args.write:
        import write_demo  # noqa: PLC0415

        write_demo.write(args.out, args.write, DEMO, tokenizer, heldout_ids)
    return 0


def bench(train_ids, tc: TrainConfig, n: int) -> None:
    import jax
    import jax.numpy as jnp

    params = init_params(DEMO, jax.random.PRNGKey(SEED))
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    step_fn = make_step(DEMO, tc)
    batch = jnp.asarray(windows(train_ids, tc.seq + 1)[: tc.batch])
    t0 = time.perf_counter()
    params, m, v, ce, _ = step_fn(params, m, v, jnp.int32(0), batch)
    float(ce)
    log(f"compile+first step {time.perf_counter() - t0:.1f} s, loss {float(ce):.3f}")
    t0 = time.perf_counter()
    for i in range(n):
        params, m, v, ce, _ = step_fn(params, m, v, jnp.int32(i + 1), batch)
    float(ce)
    dt = (time.perf_counter() - t0) / n
    log(f"{dt:.3f} s/step, {tc.batch * tc.seq / dt:.0f} tok/s, loss {float(ce):.3f}")


if __name__ == "__main__":
    sys.exit(main())
