"""Configs, meshes and inputs shared by test_sharding.py and its 8-device worker (no jax here)."""

from __future__ import annotations

import numpy as np

from grokcli.config import ModelConfig

_BASE = dict(pad_token=0, eos_token=2, sequence_len=64, embedding_multiplier_scale=8.0,
             output_multiplier_scale=0.5773502691896257, widening_factor=2, attn_output_multiplier=0.25)

CONFIGS = {
    # Every sharded dimension divides 1, 2, 4 and 8: heads, kv heads, ffn (48), vocab.
    "divides": ModelConfig(**_BASE, vocab_size=256, emb_size=32, key_size=8, num_q_heads=16, num_kv_heads=8,
                           num_layers=1, num_experts=8, num_selected_experts=2),
    # 6 q / 3 kv heads, vocab 252 and emb 36: most dimensions do not divide 4 or 8, so the rules
    # fall back to other dimensions or replicate; ffn 48 divides 3 and 6 as well.
    "odd": ModelConfig(**_BASE, vocab_size=252, emb_size=36, key_size=4, num_q_heads=6, num_kv_heads=3,
                       num_layers=1, num_experts=4, num_selected_experts=2),
}

MESHES = {name: ["none", "1x2", "1x4", "1x8", "2x4"] for name in CONFIGS}
LOGITS_ONLY_MESHES = {"odd": ["1x3", "1x6"]}  # model-axis sizes that do not divide the 8 row blocks

TOKENS = [[3, 17, 5, 99, 42, 7, 11, 13, 200], [4, 8, 0, 15, 16, 23, 42, 108, 1]]  # a pad (0) mid-row
PROMPTS = [[5, 6, 7, 8, 9], [30, 31, 32]]

# Row-parallel matrices get very different gains per block of input rows, so their 8 rows of
# scales differ widely: applying one block's scales to another block's rows would show.
BLOCK_GAINS = np.array([0.5, 2.0, 1.0, 0.25, 4.0, 1.0, 0.5, 2.0], np.float32)


def scaled_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """random_params with block-dependent gains on the row-blocked (row-parallel) weights."""
    from grokcli.checkpoint import random_params
    from grokcli.params import param_specs
    from grokcli.quant import quantize

    params = random_params(cfg, seed)
    for spec in param_specs(cfg):
        if spec.row_blocks == 1 or spec.layer is None:
            continue
        layer = params["layers"][spec.layer]
        w = layer[spec.name].dequantize(np.float32)
        n_in = w.shape[-2]
        gains = np.repeat(BLOCK_GAINS[: spec.row_blocks], n_in // spec.row_blocks)
        layer[spec.name] = quantize(w * gains[:, None], spec.row_blocks)
    return params
