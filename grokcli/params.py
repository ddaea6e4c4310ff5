"""Every parameter of the model declared once: name, reference path, shape, storage, logical axes.

The checkpoint reader/writer, the model, the sharding rules and the memory planner all derive
what they need from `param_specs(cfg)`; nothing else lists parameters.

The params pytree used everywhere in grokcli is::

    {"embed": [vocab, emb] f32, "final_norm": [emb] f32,
     "layers": {name: [layers, ...] array, or QuantizedWeight / Int4Weight of such arrays,
                for each LAYER_PARAMS entry}}

Every per-layer leaf is stacked over the layers (leading axis `LAYER_AXIS`, never sharded), so
the model runs its layers as one `lax.scan` and compiles once whatever the depth. Layer `i` of a
checkpoint (file `decoder_layer_i`, in the files' lexicographic order) is slot `i` of each stack.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_dtypes
import numpy as np

from .config import ModelConfig

LAYER_AXIS = "layers"  # logical name of the stacked leaves' leading axis

# The release was written from an 8-way model-parallel mesh: row-parallel matrices carry one row
# of scales per block of in/8 consecutive input rows.
ROW_BLOCKS = 8


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter leaf (one checkpoint file)."""

    name: str  # key in our params pytree ("embed", or a per-layer key such as "w_gate")
    layer: int | None  # decoder layer index, None for the two global leaves
    module: str  # the reference's Haiku module path, e.g. "transformer/decoder_layer_3/moe/linear"
    param: str  # the reference's parameter name inside the module ("w", "scale", "embeddings")
    shape: tuple[int, ...]  # logical (dequantised) shape
    axes: tuple[str, ...]  # logical axis names, one per dimension (see sharding.py)
    quantized: bool  # stored as QuantizedWeight8bit(int8 weight, bf16 scales)
    row_blocks: int  # rows of scales: 1 (per output channel) or ROW_BLOCKS (row-parallel)

    @property
    def path(self) -> str:
        """Full reference path as in the release's leaf listing."""
        return f"params/{self.module}/{self.param}"

    @property
    def sort_key(self) -> tuple[str, str]:
        """Position in jax's flatten order of the Haiku dict: module path, then param name, as strings."""
        return (self.module, self.param)

    @property
    def scales_shape(self) -> tuple[int, ...]:
        """Shape of the scales of a quantized leaf: the weight's, with the input dim cut to the row blocks."""
        return self.shape[:-2] + (self.row_blocks, self.shape[-1])

    @property
    def where(self) -> str:
        """Human-readable location used in error messages ("layer 3 moe/linear")."""
        short = self.module.split("/", 2)[-1] if self.layer is not None else self.module
        return f"layer {self.layer} {short}" if self.layer is not None else short


# name -> (module suffix, param name, shape(cfg), axes, quantized, row_blocks)
_ShapeFn = Callable[[ModelConfig], tuple]
LAYER_PARAMS: dict[str, tuple[str, str, _ShapeFn, tuple, bool, int]] = {
    "w_gate": ("moe/linear", "w", lambda c: (c.num_experts, c.emb_size, c.ffn_size),
               ("expert", "emb", "ffn"), True, 1),
    "w_down": ("moe/linear_1", "w", lambda c: (c.num_experts, c.ffn_size, c.emb_size),
               ("expert", "ffn", "emb"), True, ROW_BLOCKS),
    "w_up": ("moe/linear_v", "w", lambda c: (c.num_experts, c.emb_size, c.ffn_size),
             ("expert", "emb", "ffn"), True, 1),
    "k": ("multi_head_attention/key", "w", lambda c: (c.emb_size, c.num_kv_heads * c.key_size),
          ("emb", "kv_heads"), True, 1),
    "o": ("multi_head_attention/linear", "w", lambda c: (c.num_q_heads * c.key_size, c.emb_size),
          ("q_heads", "emb"), True, ROW_BLOCKS),
    "q": ("multi_head_attention/query", "w", lambda c: (c.emb_size, c.num_q_heads * c.key_size),
          ("emb", "q_heads"), True, 1),
    "v": ("multi_head_attention/value", "w", lambda c: (c.emb_size, c.num_kv_heads * c.key_size),
          ("emb", "kv_heads"), True, 1),
    "attn_norm": ("rms_norm", "scale", lambda c: (c.emb_size,), ("emb",), False, 1),
    "attn_post_norm": ("rms_norm_1", "scale", lambda c: (c.emb_size,), ("emb",), False, 1),
    "moe_norm": ("rms_norm_2", "scale", lambda c: (c.emb_size,), ("emb",), False, 1),
    "moe_post_norm": ("rms_norm_3", "scale", lambda c: (c.emb_size,), ("emb",), False, 1),
    "router": ("router", "w", lambda c: (c.emb_size, c.num_experts), ("emb", "expert"), False, 1),
}


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """All leaves of a config, in checkpoint file order (file i holds the i-th spec)."""
    specs = [
        ParamSpec("embed", None, "language_model/in_out_embed", "embeddings",
                  (cfg.vocab_size, cfg.emb_size), ("vocab", "emb"), False, 1),
        ParamSpec("final_norm", None, "language_model/rms_norm", "scale",
                  (cfg.emb_size,), ("emb",), False, 1),
    ]
    for layer in range(cfg.num_layers):
        for name, (suffix, param, shape_fn, axes, quantized, row_blocks) in LAYER_PARAMS.items():
            specs.append(ParamSpec(name, layer, f"transformer/decoder_layer_{layer}/{suffix}", param,
                                   tuple(shape_fn(cfg)), axes, quantized, row_blocks))
    specs.sort(key=lambda s: s.sort_key)
    return specs


_DTYPE_NAMES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def device_dtypes(spec: ParamSpec, activation_dtype) -> dict[str, np.dtype]:
    """The on-device dtype of each array of a leaf, by part ("weight" and "scales", or "plain").

    Int8 weights stay int8; scales become f32 (exact for the release's bf16); the embedding is
    held in the activation dtype (the reference casts it to bf16 anyway); norms and the router stay
    f32. The loader places leaves by this rule and the memory planner counts bytes by it.
    """
    if spec.quantized:
        return {"weight": np.dtype(np.int8), "scales": np.dtype(np.float32)}
    act = np.dtype(_DTYPE_NAMES[activation_dtype] if isinstance(activation_dtype, str) else activation_dtype)
    return {"plain": act if spec.name == "embed" else np.dtype(np.float32)}


def get_leaf(params: dict, spec: ParamSpec):
    """The leaf of a params pytree that a spec describes (a layer's slot of its stack)."""
    import jax

    if spec.layer is None:
        return params[spec.name]
    return jax.tree.map(lambda stacked: stacked[spec.layer], params["layers"][spec.name])


def layer_params(params: dict, layer: int) -> dict:
    """One layer's slice of every stacked leaf, `{name: leaf}` (for oracles, tools and baselines)."""
    import jax

    return {name: jax.tree.map(lambda stacked: stacked[layer], leaf) for name, leaf in params["layers"].items()}


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary (fast device copies)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    skip = (-raw.ctypes.data) % align
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


class HostStacks:
    """The per-layer stacks of a checkpoint's params, preallocated on the host, filled file by file.

    `slot(spec)` is the array a file's big payload is read into (a float32 leaf, or an int8
    weight); `fill(spec, leaf)` records the file and writes its scales (as `scales_dtype`) into
    their slot. Memory is allocated once, untouched pages cost nothing until a file lands there.
    """

    def __init__(self, cfg: ModelConfig, scales_dtype=np.float32):
        from .quant import QuantizedWeight

        self.num_layers = cfg.num_layers
        self._stacks: dict[str, object] = {}
        self._filled: dict[str, set[int]] = {}
        for spec in param_specs(cfg):
            if spec.layer != 0:
                continue
            lead = (cfg.num_layers,)
            if spec.quantized:
                stack = QuantizedWeight(_aligned_empty(lead + spec.shape, np.int8),
                                        np.empty(lead + spec.scales_shape, scales_dtype))
            else:
                stack = _aligned_empty(lead + spec.shape, np.float32)
            self._stacks[spec.name], self._filled[spec.name] = stack, set()

    def slot(self, spec: ParamSpec) -> np.ndarray | None:
        """The slot a per-layer file is read into; None for the global leaves."""
        if spec.layer is None:
            return None
        stack = self._stacks[spec.name]
        return (stack.weight if spec.quantized else stack)[spec.layer]

    def fill(self, spec: ParamSpec, leaf) -> bool:
        """Record a per-layer leaf (copied into its slot unless read there); True once its stack is full."""
        stack = self._stacks[spec.name]
        if spec.quantized:
            stack.scales[spec.layer] = np.asarray(leaf.scales).astype(stack.scales.dtype)
            leaf = leaf.weight
        slot = self.slot(spec)
        if not np.may_share_memory(slot, leaf):
            slot[...] = leaf
        self._filled[spec.name].add(spec.layer)
        return len(self._filled[spec.name]) == self.num_layers

    def pop(self, name: str):
        """The finished stack of `name`, handed over (this object forgets it)."""
        missing = sorted(set(range(self.num_layers)) - self._filled[name])
        if missing:
            raise ValueError(f"{name}: layers {missing[:5]} were never read")
        del self._filled[name]
        return self._stacks.pop(name)


def assemble(cfg: ModelConfig, leaves: dict[tuple[str, int | None], object]) -> dict:
    """Build the params pytree from leaves keyed by (name, layer), stacking each per-layer name.

    For small models, tests and benchmarks (the leaves and the stacks coexist): numpy leaves give
    numpy stacks, jax arrays (or tracers, under `jax.eval_shape`) are stacked by jax. Loading a
    checkpoint fills `HostStacks` file by file instead.
    """
    import jax
    import jax.numpy as jnp

    def stack(*xs):
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)

    layers = {name: jax.tree.map(stack, *[leaves[(name, layer)] for layer in range(cfg.num_layers)])
              for name in LAYER_PARAMS}
    return {"embed": leaves[("embed", None)], "final_norm": leaves[("final_norm", None)], "layers": layers}
