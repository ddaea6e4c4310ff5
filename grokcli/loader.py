"""`load(path)`: a checkpoint directory -> a Model on the local devices, plus its tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig, load_config
from .layout import TOKENIZER_NAME
from .errors import CheckpointError, TokenizerError
from .params import ParamSpec, assemble, param_specs
from .quant import QuantizedWeight

Progress = Callable[[int, int, int, int], None]  # (bytes_done, bytes_total, files_done, files_total)


@dataclasses.dataclass
class Model:
    """A loaded model: config, parameters on device, and the compiled functions that use them."""

    config: ModelConfig
    params: dict
    dtype: jnp.dtype  # activation dtype (f32 on CPU, bf16 on accelerators)
    mesh: object = None  # a jax.sharding.Mesh when sharded over several devices
    path: Path | None = None
    # Compiled executables keyed by (kind, shapes): generation reuses them across requests.
    compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    def logits(self, tokens) -> np.ndarray:
        """Full-sequence logits `[B, T, vocab]` (float32 numpy) for int tokens `[B, T]`, no cache."""
        from . import model as model_fn

        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an integer array [batch, time], got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        key = ("logits", tokens.shape)
        if key not in self.compiled:
            cfg, dtype = self.config, self.dtype
            # On a mesh the logits come back replicated: every process (host) can read them.
            pinned = {} if self.mesh is None else {"out_shardings": _replicated(self.mesh)}
            self.compiled[key] = jax.jit(lambda p, t: model_fn.logits(p, t, cfg, dtype=dtype), **pinned)
        tokens = tokens.astype(np.int32)
        tokens_dev = jnp.asarray(tokens) if self.mesh is None else _put(tokens, _replicated(self.mesh))
        return np.asarray(self.compiled[key](self.params, tokens_dev), np.float32)

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(s.shape)) for s in param_specs(self.config))


def _replicated(mesh):
    from .sharding import replicated

    return replicated(mesh)


def _put(array, sharding):
    from .sharding import put

    return put(array, sharding)


def resolve_tokenizer_path(checkpoint_dir: Path, tokenizer: str | Path | None) -> Path | None:
    """The tokenizer to use: the one given, else `tokenizer.model` in the checkpoint dir, else None."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise TokenizerError(f"tokenizer not found: {path}")
        return path
    candidate = checkpoint_dir / TOKENIZER_NAME
    return candidate if candidate.is_file() else None


def to_device_leaf(spec: ParamSpec, leaf, dtype, place=None):
    """Host leaf -> device leaf: int8 weights stay int8, scales become f32 (exact for bf16).

    `place(spec, array, part)` puts one array on the devices (`part` is "weight", "scales" or
    "plain"); the default puts it on the default device.
    """
    place = place or (lambda spec, arr, part: jax.device_put(arr))
    if isinstance(leaf, QuantizedWeight):
        return QuantizedWeight(place(spec, np.asarray(leaf.weight), "weight"),
                               place(spec, np.asarray(leaf.scales).astype(np.float32), "scales"))
    arr = np.asarray(leaf)
    if spec.name == "embed" and jnp.dtype(dtype) != jnp.float32:
        arr = arr.astype(jnp.dtype(dtype))  # the reference casts embeddings to bf16 anyway
    return place(spec, arr, "plain")


def load(path: str | Path, tokenizer: str | Path | None = None, *, progress: Progress | None = None,
         dtype=None, workers: int | None = None, mesh=None, reserve_for=None, device_memory: int | None = None):
    """Load a checkpoint directory (`ckpt-0/`, optional `config.json` and `tokenizer.model`).

    Returns `(model, tokenizer)`; the tokenizer is None when there is none to load.
    Before any tensor file is read, the config is checked against the tensors' shapes and the
    memory plan (weights, plus the KV cache and activations of `reserve_for`, a
    `memory.Reservation`; default batch 1 over the whole context) against `device_memory` bytes
    per device (default: as detected; unknown on CPU): MemoryPlanError says what does not fit.
    """
    from . import checkpoint
    from .model import compute_dtype_for_backend
    from .tokenizer import Tokenizer, check_tokenizer

    root = Path(path)
    if mesh is not None and not hasattr(mesh, "devices"):
        from .sharding import make_mesh

        mesh = make_mesh(mesh)  # "DATAxMODEL" or (data, model): checked before any file is read
    if mesh is not None and mesh.devices.size == 1:
        mesh = None  # one device: the plain layout, so an explicit 1x1 mesh runs (and caches) the same code
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    cfg = load_config(root)
    dtype = dtype or compute_dtype_for_backend()
    from .memory import check_fits, plan_for_devices

    check_fits(plan_for_devices(cfg, mesh, reserve_for, device_memory=device_memory, dtype=jnp.dtype(dtype).name))
    tok_path = resolve_tokenizer_path(root, tokenizer)
    tok = None
    if tok_path is not None:
        tok = Tokenizer.load(tok_path)
        check_tokenizer(tok, cfg)
    checkpoint.check_checkpoint_shapes(root, cfg)

    place = None
    if mesh is not None:
        from .sharding import make_placer

        place = make_placer(cfg, mesh)  # each device receives only its own slice of each leaf
    leaves = {}
    for spec, leaf in checkpoint.iter_leaves(root, cfg, workers=workers or 4, progress=progress, check=False):
        leaves[(spec.name, spec.layer)] = to_device_leaf(spec, leaf, dtype, place=place)
        del leaf  # host memory: one file in flight per reader thread, not the checkpoint
    params = assemble(cfg, leaves)
    return Model(config=cfg, params=params, dtype=dtype, mesh=mesh, path=root), tok
