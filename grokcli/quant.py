"""The int8 weight type (a pytree) and the one matmul helper every projection goes through."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """An int8 matrix (or stack of matrices) with scales, as the release's QuantizedWeight8bit.

    `weight` is int8 `[..., in, out]`; `scales` is `[..., blocks, out]`: `blocks` is 1 for
    per-output-channel scales, or 8 for the release's row-parallel matrices, where each row of
    scales applies to one block of `in / blocks` consecutive input rows.
    """

    weight: jax.Array | np.ndarray
    scales: jax.Array | np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def row_blocks(self) -> int:
        return int(self.scales.shape[-2])

    def dequantize(self, dtype=jnp.float32):
        """The full-precision matrix. For tests and tools only: the model never calls this."""
        w = self.weight
        *lead, n_in, n_out = w.shape
        b = self.row_blocks
        xp = jnp if isinstance(w, jax.Array) else np
        blocks = xp.asarray(w).astype(np.float32).reshape(*lead, b, n_in // b, n_out)
        full = blocks * xp.asarray(self.scales).astype(np.float32)[..., :, None, :]
        return full.reshape(*lead, n_in, n_out).astype(dtype)


def quantize(w: np.ndarray, row_blocks: int = 1) -> QuantizedWeight:
    """int8 absmax quantisation of `[..., in, out]` per output channel and per block of input rows.

    Scales are rounded to bfloat16 (the release's storage type) before the int8 values are
    computed, so that `weight * scales` is exactly what a reader of the file gets back.
    """
    import ml_dtypes

    w = np.asarray(w, dtype=np.float32)
    *lead, n_in, n_out = w.shape
    if n_in % row_blocks:
        raise ValueError(f"input dimension {n_in} is not divisible into {row_blocks} row blocks")
    blocks = w.reshape(*lead, row_blocks, n_in // row_blocks, n_out)
    absmax = np.abs(blocks).max(axis=-2)  # [..., blocks, out]
    scales = (absmax / 127.0).astype(ml_dtypes.bfloat16)
    safe = np.where(scales.astype(np.float32) == 0, 1.0, scales.astype(np.float32))
    q = np.clip(np.rint(blocks / safe[..., :, None, :]), -127, 127).astype(np.int8)
    return QuantizedWeight(weight=q.reshape(w.shape), scales=scales)
