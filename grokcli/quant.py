"""The int8 weight type (a pytree) and the one matmul helper every projection goes through."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .quant4 import Int4Weight, qmatmul4


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


# ---------------------------------------------------------------------------------------------
# The one matmul helper.
#
# On a CPU the native kernel (grokcli/native) does every mode when it builds here: it streams
# the int8 weights on all cores (about 2x the XLA loops below at batch 1, benchmarks/README.md).
#
# Otherwise: XLA:CPU materialises a full f32 copy of an int8 weight on every dot, however the dot is
# written. So on CPU the weight is dequantised in chunks of about 256 KiB inside a `lax.scan`, each
# chunk multiplied and accumulated, and scales applied on the output side (exact: a scale is
# constant over its block of input rows). On GPU/TPU the compiler fuses the int8 -> bf16 convert
# into the matmul, so the plain form is used there.
#
# Why 256 KiB: XLA:CPU splits an elementwise loop whose output is 512 KiB or more over two threads,
# and on a small VM waking the second thread costs more than the loop (a 1 MiB convert took
# 0.4 ms); chunks below that run on one thread, and stay in L2 for the dot that follows. With the
# per-row dynamic slices of `_gathered`, the batch-1 decode step of the benchmark config is 1.26x
# faster than with 1 MiB chunks and a gather (benchmarks/README.md).

_CHUNK_ELEMENTS = 1 << 16  # f32 elements of one dequantised chunk (256 KiB)


def _chunked_backend() -> bool:
    return jax.default_backend() == "cpu"


_MIN_CHUNK_ROWS = 8  # wide matrices (Grok-1: 32768 outputs) get larger chunks, not 1-row loops


def _rows_per_chunk(n_rows: int, n_out: int, copies: int = 1, chunk_elements: int | None = None) -> int:
    """Largest divisor of `n_rows` whose chunk (rows x out x copies) stays within the chunk size.

    At least `_MIN_CHUNK_ROWS` rows are aimed for, so that a loop step never shrinks to a row or
    two of a very wide matrix, where the per-step overhead would dominate.
    """
    target = max(_MIN_CHUNK_ROWS, (chunk_elements or _CHUNK_ELEMENTS) // max(1, n_out * copies))
    best = 1
    for d in range(1, n_rows + 1):
        if n_rows % d == 0 and d <= target:
            best = d
    return best


def qmatmul(x, w, *, experts=None, group_sizes=None, compute_dtype=None):
    """`x @ w` for a plain or quantized weight; the only way the model multiplies by a weight.

    - `w` `[in, out]`: x is `[..., in]`.
    - `w` `[E, in, out]` and `experts` `[N]` (int): row n of x `[N, in]` uses expert `experts[n]`;
      only the selected experts' weights are read (decode: few rows).
    - `w` `[E, in, out]` and `group_sizes` `[E]`: x `[N, in]` is sorted by expert, the first
      group_sizes[0] rows use expert 0, and so on (prefill: many rows, grouped matmul).
    `experts` must also be given with `group_sizes` (the expert of each sorted row, for the scales).
    """
    dtype = compute_dtype or x.dtype
    if isinstance(w, Int4Weight):
        return qmatmul4(x, w, experts=experts, group_sizes=group_sizes, dtype=dtype)
    if not isinstance(w, QuantizedWeight):
        w = jnp.asarray(w, dtype)
        x = x.astype(dtype)
        if group_sizes is not None:
            return jax.lax.ragged_dot(x, w, group_sizes)
        if experts is not None:
            return jnp.einsum("ni,nio->no", x, w[experts])
        return x @ w
    x = x.astype(dtype)
    if native_kernel_in_use(math.prod(x.shape[:-1])):
        return _native(x, w, experts, dtype)
    if group_sizes is not None:
        return _grouped(x, w, group_sizes, experts, dtype)
    if experts is not None:
        return _gathered(x, w, experts, dtype)
    lead = x.shape[:-1]
    out = _dense(x.reshape(-1, x.shape[-1]), w, dtype)
    return out.reshape(*lead, out.shape[-1])


def native_kernel_in_use(rows: int | None = None) -> bool:
    """Whether the native kernel (grokcli/native) does a matmul of `rows` rows on this CPU.

    It does where it builds, on a single CPU device, and where it measured faster than the XLA
    loops for that shape class (decode batch 1 / small batch / prefill; `native.select`), unless
    GROK_NATIVE_KERNELS forces a side. `rows=None`: whether it is used for any class. Several
    (simulated) CPU devices keep the XLA loops: XLA cannot partition a custom call, so it would
    gather every sharded weight onto each device first.
    """
    if not _chunked_backend() or jax.device_count() != 1:
        return False
    from . import native

    if rows is None:
        return native.usable() and any(native.chosen_for(r) for r in (1, 16, 64))
    return native.chosen_for(rows)


def cpu_matmul_report() -> dict:
    """Which int8 matmul runs on this CPU per shape class, with the measured rates (`native.report`)."""
    from . import native

    if jax.device_count() != 1:
        return {"kernel": "off", "reason": f"{jax.device_count()} CPU devices; the native kernel runs on a single "
                "device", "forced": None, "library": None, "classes": None}
    native_kernel_in_use()
    return native.report()


def cpu_matmul_status() -> str:
    """One line: which int8 matmul runs on this CPU, and why (measured here on first call, as a generation would)."""
    from . import native

    if jax.device_count() != 1:
        return f"XLA loops ({jax.device_count()} CPU devices; the native kernel runs on a single device)"
    native_kernel_in_use()
    return native.status()


def _native(x, w: QuantizedWeight, experts, dtype):
    """All three modes in the native kernel: rows are grouped by expert inside it (dense: expert 0)."""
    from . import native

    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    weight, scales = w.weight, w.scales.astype(jnp.float32)
    if experts is None:
        weight, scales = weight[None], scales[None]
        experts = jnp.zeros((rows.shape[0],), jnp.int32)
    out = native.qmatmul_rows(rows, weight, scales, experts.astype(jnp.int32))
    return out.astype(dtype).reshape(*lead, out.shape[-1])


def _dense(x, w: QuantizedWeight, dtype):
    """x [N, in] @ w [in, out]."""
    n_in, n_out = w.weight.shape
    blocks = w.row_blocks
    scales = w.scales.astype(dtype)
    if not _chunked_backend():
        xb = x.reshape(x.shape[0], blocks, n_in // blocks)
        wb = w.weight.reshape(blocks, n_in // blocks, n_out).astype(dtype)
        partial = jnp.einsum("nbi,bio->nbo", xb, wb, preferred_element_type=jnp.float32)
        return (partial * scales[None].astype(jnp.float32)).sum(1).astype(dtype)
    rows = _rows_per_chunk(n_in // blocks, n_out)
    n_chunks = n_in // rows
    w_chunks = w.weight.reshape(n_chunks, rows, n_out)
    x_chunks = x.reshape(x.shape[0], n_chunks, rows).transpose(1, 0, 2)
    chunk_scales = scales[(jnp.arange(n_chunks) * rows) // (n_in // blocks)]  # [chunks, out]

    def step(acc, inputs):
        xc, wc, sc = inputs
        return acc + (xc @ wc.astype(dtype)) * sc, None

    acc, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], n_out), dtype), (x_chunks, w_chunks, chunk_scales))
    return acc


def _gathered(x, w: QuantizedWeight, experts, dtype):
    """Row n of x [N, in] times expert experts[n] of w [E, in, out], reading only those experts."""
    _, n_in, n_out = w.weight.shape
    blocks = w.row_blocks
    block_rows = n_in // blocks
    scales = w.scales.astype(dtype)  # [E, blocks, out]
    if not _chunked_backend():
        # One row at a time, so that only one expert's converted weight exists at once (a gather
        # of every row's expert would hold rows x [in, out] in the compute dtype: GBs for Grok-1).
        def one_row(inputs):
            xn, e = inputs
            wb = jax.lax.dynamic_index_in_dim(w.weight, e, keepdims=False)
            wb = wb.reshape(blocks, block_rows, n_out).astype(dtype)
            partial = jnp.einsum("bi,bio->bo", xn.reshape(blocks, block_rows), wb,
                                 preferred_element_type=jnp.float32)
            return (partial * scales[e].astype(jnp.float32)).sum(0).astype(dtype)

        return jax.lax.map(one_row, (x, experts))
    rows = _rows_per_chunk(block_rows, n_out, copies=x.shape[0])
    n_chunks = n_in // rows
    x_chunks = x.reshape(x.shape[0], n_chunks, rows).transpose(1, 0, 2)
    row_scales = scales[experts]  # [N, blocks, out]

    def step(acc, inputs):
        i, xc = inputs
        # [N, rows, out]: only the selected experts' rows. One dynamic slice per row rather than a
        # gather: XLA:CPU emits a gather inside the convert loop element by element (slower).
        wc = jnp.stack([jax.lax.dynamic_slice(w.weight, (experts[n], i * rows, 0), (1, rows, n_out))[0]
                        for n in range(x.shape[0])]).astype(dtype)
        sc = row_scales[:, (i * rows) // block_rows]
        return acc + jnp.einsum("nr,nro->no", xc, wc) * sc, None

    acc, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], n_out), dtype), (jnp.arange(n_chunks), x_chunks))
    return acc


def _grouped(x, w: QuantizedWeight, group_sizes, experts, dtype):
    """x [N, in] sorted by expert (group_sizes [E]) times w [E, in, out], via grouped matmuls."""
    n_exp, n_in, n_out = w.weight.shape
    blocks = w.row_blocks
    block_rows = n_in // blocks
    scales = w.scales.astype(dtype)
    if not _chunked_backend():
        row_scales = scales[experts]  # [N, blocks, out]
        parts = []
        for b in range(blocks):
            sl = slice(b * block_rows, (b + 1) * block_rows)
            part = jax.lax.ragged_dot(x[:, sl], w.weight[:, sl].astype(dtype), group_sizes,
                                      preferred_element_type=jnp.float32)
            parts.append(part * row_scales[:, b].astype(jnp.float32))
        return sum(parts).astype(dtype)
    return _grouped_tiles(x, w, group_sizes, dtype)


def _tile_rows(n_rows: int, n_exp: int) -> int:
    """Rows per tile of the CPU grouped matmul: about an average group, a power of two in [8, 128].

    Each expert's rows are multiplied in tiles of this many, so up to tile - 1 rows per expert are
    wasted work, while larger tiles make each dot more efficient.
    """
    tile = 8
    while tile * 2 <= min(128, n_rows / n_exp):
        tile *= 2
    return tile


def _grouped_chunk_elements(tile: int) -> int:
    """f32 elements of one dequantised chunk in the grouped matmul, by tile (rows per expert).

    Few rows (decode of a batch): small chunks, as in the gathered path. More rows share each
    chunk, so larger chunks (fewer, deeper dots) pay off: 2 MiB at 16-row tiles, 4 MiB above
    (measured on the benchmark config: 64-token and 8 x 64-token prefills).
    """
    if tile <= 8:
        return _CHUNK_ELEMENTS
    return 1 << 19 if tile <= 16 else 1 << 20


def _grouped_tiles(x, w: QuantizedWeight, group_sizes, dtype):
    """The CPU grouped matmul: expert by expert, chunk by chunk, the expert's rows tile by tile.

    XLA:CPU lowers `ragged_dot` to a dense product over every expert, slower than computing all
    experts. Here each expert's int8 weight is dequantised once, one chunk of input rows at a
    time (by dynamic index: no copy of the expert), and that chunk multiplies the expert's rows
    `[start, end)` in tiles of T rows, a loop whose trip count follows the group size. Cost follows
    rows x active experts, plus at most T - 1 padded rows per expert.

    The scales are multiplied into the dequantised chunk (exact: an int8 times a bfloat16 scale is
    a float32 without rounding), so a chunk may span several row blocks: fewer, larger dots, which
    is what XLA:CPU runs efficiently (a 64-token prefill of the benchmark config: 124 ms with 2 MiB
    chunks across blocks, 165 ms with 256 KiB chunks cut at block boundaries).
    """
    n_exp, n_in, n_out = w.weight.shape
    n_rows = x.shape[0]
    block_rows = n_in // w.row_blocks
    tile = _tile_rows(n_rows, n_exp)
    rows = _rows_per_chunk(n_in, n_out, chunk_elements=_grouped_chunk_elements(tile))
    n_chunks = n_in // rows
    # Pad by one tile so that a tile starting at any row fits (dynamic_slice would shift it back).
    x = jnp.pad(x, ((0, tile), (0, 0))).reshape(n_rows + tile, n_chunks, rows)
    w_chunks = w.weight.reshape(n_exp, n_chunks, rows, n_out)
    scales = w.scales.astype(dtype)  # [E, blocks, out]
    row_block = jnp.arange(n_in) // block_rows  # the scale row of each input row
    group_sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    n_tiles = (group_sizes + tile - 1) // tile
    row_in_tile = jnp.arange(tile)

    def expert(out, e):
        start, end = starts[e], ends[e]

        def chunk(out, i):
            chunk_blocks = jax.lax.dynamic_slice_in_dim(row_block, i * rows, rows)
            # [rows, out], dequantised once for all the expert's rows
            wc = w_chunks[e, i].astype(dtype) * scales[e][chunk_blocks]

            def tile_step(k, out):
                r0 = start + k * tile
                xt = jax.lax.dynamic_slice(x, (r0, i, 0), (tile, 1, rows))[:, 0]
                keep = (r0 + row_in_tile < end)[:, None]
                current = jax.lax.dynamic_slice_in_dim(out, r0, tile)
                return jax.lax.dynamic_update_slice_in_dim(out, current + jnp.where(keep, xt @ wc, 0), r0, 0)

            return jax.lax.fori_loop(0, n_tiles[e], tile_step, out), None

        # An expert no row chose is skipped: its weight is not read at all.
        out = jax.lax.cond(n_tiles[e] > 0, lambda o: jax.lax.scan(chunk, o, jnp.arange(n_chunks))[0],
                           lambda o: o, out)
        return out, None

    out, _ = jax.lax.scan(expert, jnp.zeros((n_rows + tile, n_out), dtype), jnp.arange(n_exp))
    return out[:n_rows]
