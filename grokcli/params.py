"""Every parameter of the model declared once: name, reference path, shape, storage, logical axes.

The checkpoint reader/writer, the model, the sharding rules and the memory planner all derive
what they need from `param_specs(cfg)`; nothing else lists parameters.

The params pytree used everywhere in grokcli is::

    {"embed": [vocab, emb] f32, "final_norm": [emb] f32,
     "layers": [ {name: array or QuantizedWeight for each LAYER_PARAMS entry}, ... ]}
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .config import ModelConfig

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


def get_leaf(params: dict, spec: ParamSpec):
    """The leaf of a params pytree that a spec describes."""
    return params[spec.name] if spec.layer is None else params["layers"][spec.layer][spec.name]


def assemble(cfg: ModelConfig, leaves: dict[tuple[str, int | None], object]) -> dict:
    """Build the params pytree from leaves keyed by (name, layer)."""
    return {
        "embed": leaves[("embed", None)],
        "final_norm": leaves[("final_norm", None)],
        "layers": [{name: leaves[(name, layer)] for name in LAYER_PARAMS} for layer in range(cfg.num_layers)],
    }
