"""The int4 weight form: two 4-bit values per byte, one scale per group of input rows.

`Int4Weight` is a pytree like `quant.QuantizedWeight`; `quant.qmatmul` dispatches to `qmatmul4`
here, so the model code never branches on bits.

Layout of a `[..., in, out]` matrix:
- `packed` uint8 `[..., in/2, out]`: byte `r` holds input row `2r` in its low nibble and row
  `2r + 1` in its high nibble. The matmul never interleaves the rows back: it splits the
  activations instead, `x @ W = x[..., 0::2] @ W_even + x[..., 1::2] @ W_odd`.
- `scales` `[..., in/group, out]`: one scale per output column and group of `group` consecutive
  input rows (bfloat16 on disk).
- `offsets`: None for the symmetric form (nibbles are two's-complement -8..7, value = q * scale),
  or like `scales` for the asymmetric form (nibbles 0..15, value = q * scale + offset).

Quantisation (`quantize4`, `requantize`) runs on the host in numpy, chunk by chunk, so that
requantising a Grok-1 leaf never holds more than a slice of it in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
SCHEMES = ("sym", "sym-search", "asym", "asym-search")
DEFAULT_GROUP_SIZE = 128
DEFAULT_SCHEME = "sym-search"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int4Weight:
    """A 4-bit matrix (or stack of matrices) with per-group scales along the input dimension."""

    packed: jax.Array | np.ndarray  # uint8 [..., in/2, out]
    scales: jax.Array | np.ndarray  # [..., in/group, out]
    offsets: jax.Array | np.ndarray | None = None  # like scales (asymmetric), or None

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantised) shape `[..., in, out]`."""
        *lead, half, n_out = self.packed.shape
        return (*lead, 2 * half, n_out)

    @property
    def group_size(self) -> int:
        return self.shape[-2] // int(self.scales.shape[-2])

    @property
    def symmetric(self) -> bool:
        return self.offsets is None

    def dequantize(self, dtype=np.float32):
        """The full-precision matrix. For tests and tools only: the model never calls this."""
        if isinstance(self.packed, jax.Array):
            even, odd = _halves(self.packed, self.scales, self.offsets, jnp.float32)
            return jnp.stack([even, odd], axis=-2).reshape(self.shape).astype(dtype)
        q = unpack(np.asarray(self.packed), self.symmetric).astype(np.float32)
        return _apply_scales(q, self.scales, self.offsets).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Host side: packing and quantisation (numpy).


def pack(q: np.ndarray) -> np.ndarray:
    """Integers `[..., in, out]` in -8..7 or 0..15 -> uint8 `[..., in/2, out]` (even rows low)."""
    q = np.asarray(q)
    if q.shape[-2] % 2:
        raise ValueError(f"input dimension {q.shape[-2]} is odd: int4 packs rows in pairs")
    nib = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return nib[..., 0::2, :] | (nib[..., 1::2, :] << 4)


def unpack(packed: np.ndarray, signed: bool) -> np.ndarray:
    """uint8 `[..., in/2, out]` -> int8 `[..., in, out]` (-8..7 when signed, else 0..15)."""
    packed = np.asarray(packed, np.uint8)
    nib = np.stack([packed & 0xF, packed >> 4], axis=-2).astype(np.int8)
    if signed:
        nib = np.where(nib >= 8, nib - 16, nib).astype(np.int8)
    *lead, half, n_out = packed.shape
    return nib.reshape(*lead, 2 * half, n_out)


def _apply_scales(q: np.ndarray, scales, offsets) -> np.ndarray:
    *lead, n_in, n_out = q.shape
    s = np.asarray(scales).astype(np.float32)
    groups = s.shape[-2]
    v = q.reshape(*lead, groups, n_in // groups, n_out) * s[..., :, None, :]
    if offsets is not None:
        v = v + np.asarray(offsets).astype(np.float32)[..., :, None, :]
    return v.reshape(q.shape)


_SEARCH_SHRINK = np.linspace(1.0, 0.7, 7)  # candidate fractions of the full-range scale


def _round_bf16(a: np.ndarray) -> np.ndarray:
    return a.astype(BF16).astype(np.float32)


def _sym_codes(wg: np.ndarray, scale: np.ndarray) -> np.ndarray:
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint(wg / safe[..., None, :]), -8, 7)


def _quantize_groups_sym(wg: np.ndarray, search: bool):
    """wg `[..., groups, G, out]` -> (codes, scales): scale = the largest-magnitude value / -8.

    That value maps exactly onto -8 (llama.cpp's Q4_0 rule), so the whole 16-level range is used.
    With `search`, smaller scales (down to 0.7x) that clip the extremes are tried per group and
    column, and the one with the least squared error is kept.
    """
    idx = np.abs(wg).argmax(axis=-2)[..., None, :]
    extreme = np.take_along_axis(wg, idx, axis=-2)[..., 0, :]
    base = extreme / -8.0
    if not search:
        scale = _round_bf16(base)
        return _sym_codes(wg, scale), scale
    best_scale, best_err = None, None
    for shrink in _SEARCH_SHRINK:
        scale = _round_bf16(base * shrink)
        err = ((_sym_codes(wg, scale) * scale[..., None, :] - wg) ** 2).sum(axis=-2)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = np.where(better, scale, best_scale)
            best_err = np.where(better, err, best_err)
    return _sym_codes(wg, best_scale), best_scale


def _asym_codes(wg, scale, offset):
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint((wg - offset[..., None, :]) / safe[..., None, :]), 0, 15)


def _quantize_groups_asym(wg: np.ndarray, search: bool):
    """wg `[..., groups, G, out]` -> (codes, scales, offsets): min..max mapped onto 0..15.

    With `search`, ranges shrunk towards their middle (down to 0.7x) are tried as above.
    """
    lo, hi = wg.min(axis=-2), wg.max(axis=-2)
    best = None
    for shrink in (_SEARCH_SHRINK if search else (1.0,)):
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * shrink
        scale = _round_bf16(2 * half / 15.0)
        offset = _round_bf16(mid - half)
        codes = _asym_codes(wg, scale, offset)
        err = ((codes * scale[..., None, :] + offset[..., None, :] - wg) ** 2).sum(axis=-2)
        if best is None:
            best = [scale, offset, err]
        else:
            better = err < best[2]
            best = [np.where(better, a, b) for a, b in zip((scale, offset, err), best)]
    scale, offset, _ = best
    return _asym_codes(wg, scale, offset), scale, offset


def check_settings(n_in: int, group_size: int, scheme: str) -> None:
    """Raise ValueError unless `group_size` and `scheme` can quantise an input dimension of `n_in`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown int4 scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    if group_size < 2 or group_size % 2 or n_in % group_size:
        raise ValueError(f"group size {group_size} must be even and divide the input dimension {n_in}")


def quantize4(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE, scheme: str = DEFAULT_SCHEME) -> Int4Weight:
    """int4 quantisation of a float matrix `[..., in, out]` (numpy in, numpy out, bf16 scales).

    Scales (and offsets) are rounded to bfloat16 before the codes are chosen, so that
    `dequantize()` is exactly what a reader of the file gets back.
    """
    w = np.asarray(w, np.float32)
    *lead, n_in, n_out = w.shape
    check_settings(n_in, group_size, scheme)
    wg = w.reshape(*lead, n_in // group_size, group_size, n_out)
    search = scheme.endswith("-search")
    if scheme.startswith("sym"):
        codes, scale = _quantize_groups_sym(wg, search)
        offsets = None
    else:
        codes, scale, offset = _quantize_groups_asym(wg, search)
        offsets = offset.astype(BF16)
    packed = pack(codes.reshape(w.shape).astype(np.int8))
    return Int4Weight(packed, scale.astype(BF16), offsets)


def chunk_rows(n_in: int, group_size: int, block_rows: int, n_out: int, budget: int = 1 << 24) -> int:
    """Input rows per requantisation chunk: whole groups and whole int8 row blocks, ~budget floats."""
    unit = math.lcm(group_size, block_rows)
    rows = max(unit, (budget // max(1, n_out)) // unit * unit)
    while n_in % rows:
        rows -= unit
    return rows


def requantize(weight: np.ndarray, scales: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE,
               scheme: str = DEFAULT_SCHEME, budget: int = 1 << 24) -> Int4Weight:
    """int8 `weight` `[..., in, out]` with row-block `scales` `[..., blocks, out]` -> Int4Weight.

    Works one matrix and one chunk of about `budget` float32 values at a time: peak memory is
    the int8 input, the int4 output and a chunk, never the dequantised leaf.
    """
    weight = np.asarray(weight)
    *lead, n_in, n_out = weight.shape
    check_settings(n_in, group_size, scheme)
    blocks = scales.shape[-2]
    block_rows = n_in // blocks
    rows = chunk_rows(n_in, group_size, block_rows, n_out, budget)
    n_lead = math.prod(lead)
    w3 = weight.reshape(n_lead, n_in, n_out)
    s3 = np.asarray(scales).reshape(n_lead, blocks, n_out)
    packed = np.empty((n_lead, n_in // 2, n_out), np.uint8)
    out_scales = np.empty((n_lead, n_in // group_size, n_out), BF16)
    out_offsets = None if scheme.startswith("sym") else np.empty_like(out_scales)
    for m in range(n_lead):
        for r0 in range(0, n_in, rows):
            b0 = r0 // block_rows
            nb = max(1, rows // block_rows)
            chunk = w3[m, r0:r0 + rows].astype(np.float32).reshape(nb, -1, n_out)
            chunk *= s3[m, b0:b0 + nb].astype(np.float32)[:, None, :]
            q = quantize4(chunk.reshape(rows, n_out), group_size, scheme)
            packed[m, r0 // 2:(r0 + rows) // 2] = q.packed
            out_scales[m, r0 // group_size:(r0 + rows) // group_size] = q.scales
            if out_offsets is not None:
                out_offsets[m, r0 // group_size:(r0 + rows) // group_size] = q.offsets
    shape = lambda a: a.reshape(*lead, *a.shape[1:])  # noqa: E731
    return Int4Weight(shape(packed), shape(out_scales), None if out_offsets is None else shape(out_offsets))


# ---------------------------------------------------------------------------------------------
# Device side: the matmul. The same three modes as quant.qmatmul.


def _halves(packed, scales, offsets, dtype):
    """Dequantise packed `[..., R, out]` into its even and odd input rows, each `[..., R, out]`.

    `scales`/`offsets` are `[..., m, out]`: m groups, each covering R/m packed rows.
    """
    if offsets is None:
        signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
        codes = (jnp.left_shift(signed, 4) >> 4, signed >> 4)  # arithmetic shifts sign-extend
    else:
        codes = (packed & 0xF, packed >> 4)
    *lead, rows, n_out = packed.shape
    m = scales.shape[-2]
    s = scales.astype(dtype)[..., :, None, :]
    o = None if offsets is None else offsets.astype(dtype)[..., :, None, :]

    def dequant(q):
        v = q.astype(dtype).reshape(*lead, m, rows // m, n_out) * s
        return (v if o is None else v + o).reshape(*lead, rows, n_out)

    return dequant(codes[0]), dequant(codes[1])


def _split(x):
    """Even and odd input columns of x `[N, in]`."""
    return x[:, 0::2], x[:, 1::2]


def _chunked_backend() -> bool:
    from . import quant

    return quant._chunked_backend()


def _chunk_rows(half: int, n_out: int, half_group: int, copies: int = 1,
                chunk_elements: int | None = None) -> int:
    """Packed rows per dequantised chunk on CPU: a divisor of `half` that is a divisor or a
    multiple of a group's packed rows (so a chunk's scales are one slice), within the chunk size
    of the int8 loops (two halves are dequantised per chunk)."""
    from . import quant

    elements = chunk_elements or quant._CHUNK_ELEMENTS
    target = max(quant._MIN_CHUNK_ROWS, elements // max(1, 2 * n_out * copies))
    best = 1
    for d in range(1, half + 1):
        if half % d == 0 and d <= target and (d % half_group == 0 or half_group % d == 0):
            best = d
    return best


def _chunk_group_slice(a, lead_index, start_row: int | jax.Array, rows: int, half_group: int):
    """The `[m, out]` scales (or offsets) of packed rows `[start_row, start_row + rows)`."""
    if a is None:
        return None
    m = max(1, rows // half_group)
    mat = a if lead_index is None else jax.lax.dynamic_index_in_dim(a, lead_index, keepdims=False)
    return jax.lax.dynamic_slice_in_dim(mat, start_row // half_group, m)


def qmatmul4(x, w: Int4Weight, experts=None, group_sizes=None, dtype=None):
    """`quant.qmatmul` for an Int4Weight (same modes and arguments)."""
    dtype = dtype or x.dtype
    x = x.astype(dtype)
    if group_sizes is not None:
        return _grouped(x, w, group_sizes, dtype)
    if experts is not None:
        return _gathered(x, w, experts, dtype)
    lead = x.shape[:-1]
    out = _dense(x.reshape(-1, x.shape[-1]), w, dtype)
    return out.reshape(*lead, out.shape[-1])


def _dense(x, w: Int4Weight, dtype):
    """x [N, in] @ w [in, out]."""
    half, n_out = w.packed.shape
    xe, xo = _split(x)
    if not _chunked_backend():
        even, odd = _halves(w.packed, w.scales, w.offsets, dtype)
        return _two_dots(xe, even, xo, odd, dtype)
    hg = w.group_size // 2
    rows = _chunk_rows(half, n_out, hg)
    n_chunks = half // rows
    xe = xe.reshape(x.shape[0], n_chunks, rows).transpose(1, 0, 2)
    xo = xo.reshape(x.shape[0], n_chunks, rows).transpose(1, 0, 2)

    def step(acc, inputs):
        i, xec, xoc = inputs
        pc = jax.lax.dynamic_slice_in_dim(w.packed, i * rows, rows)
        even, odd = _halves(pc, _chunk_group_slice(w.scales, None, i * rows, rows, hg),
                            _chunk_group_slice(w.offsets, None, i * rows, rows, hg), dtype)
        return acc + xec @ even + xoc @ odd, None

    acc, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], n_out), dtype), (jnp.arange(n_chunks), xe, xo))
    return acc


def _two_dots(xe, even, xo, odd, dtype, spec: str = "ni,io->no"):
    f32 = jnp.float32
    return (jnp.einsum(spec, xe, even, preferred_element_type=f32)
            + jnp.einsum(spec, xo, odd, preferred_element_type=f32)).astype(dtype)


def _gathered(x, w: Int4Weight, experts, dtype):
    """Row n of x [N, in] times expert experts[n] of w [E, in, out], reading only those experts."""
    _, half, n_out = w.packed.shape
    xe, xo = _split(x)
    if not _chunked_backend():
        # One row at a time, so that only one expert's dequantised weight exists at once.
        def one_row(inputs):
            xen, xon, e = inputs
            pick = lambda a: None if a is None else jax.lax.dynamic_index_in_dim(a, e, keepdims=False)  # noqa: E731
            even, odd = _halves(pick(w.packed), pick(w.scales), pick(w.offsets), dtype)
            return _two_dots(xen, even, xon, odd, dtype, "i,io->o")

        return jax.lax.map(one_row, (xe, xo, experts))
    hg = w.group_size // 2
    n = x.shape[0]
    rows = _chunk_rows(half, n_out, hg, copies=n)
    n_chunks = half // rows
    xe = xe.reshape(n, n_chunks, rows).transpose(1, 0, 2)
    xo = xo.reshape(n, n_chunks, rows).transpose(1, 0, 2)

    def step(acc, inputs):
        i, xec, xoc = inputs
        # One dynamic slice per row (not a gather: XLA:CPU gathers element by element).
        pc = jnp.stack([jax.lax.dynamic_slice(w.packed, (experts[r], i * rows, 0), (1, rows, n_out))[0]
                        for r in range(n)])
        sc = jnp.stack([_chunk_group_slice(w.scales, experts[r], i * rows, rows, hg) for r in range(n)])
        oc = None if w.offsets is None else jnp.stack(
            [_chunk_group_slice(w.offsets, experts[r], i * rows, rows, hg) for r in range(n)])
        even, odd = _halves(pc, sc, oc, dtype)
        return acc + jnp.einsum("nr,nro->no", xec, even) + jnp.einsum("nr,nro->no", xoc, odd), None

    acc, _ = jax.lax.scan(step, jnp.zeros((n, n_out), dtype), (jnp.arange(n_chunks), xe, xo))
    return acc


_ACCEL_PIECES = 8  # input slices of the accelerator grouped matmul: bounds its dequantised copy


def _grouped(x, w: Int4Weight, group_sizes, dtype):
    """x [N, in] sorted by expert (group_sizes [E]) times w [E, in, out]."""
    n_exp, half, n_out = w.packed.shape
    hg = w.group_size // 2
    xe, xo = _split(x)
    group_sizes = group_sizes.astype(jnp.int32)
    if not _chunked_backend():
        n_groups = w.scales.shape[-2]
        pieces = math.gcd(_ACCEL_PIECES, n_groups)
        rows = half // pieces
        total = None
        for p in range(pieces):
            sl = slice(p * rows, (p + 1) * rows)
            gl = slice(p * n_groups // pieces, (p + 1) * n_groups // pieces)
            even, odd = _halves(w.packed[:, sl], w.scales[:, gl],
                                None if w.offsets is None else w.offsets[:, gl], dtype)
            part = (jax.lax.ragged_dot(xe[:, sl], even, group_sizes, preferred_element_type=jnp.float32)
                    + jax.lax.ragged_dot(xo[:, sl], odd, group_sizes, preferred_element_type=jnp.float32))
            total = part if total is None else total + part
        return total.astype(dtype)
    return _grouped_cpu(xe, xo, w, group_sizes, dtype)


def _grouped_cpu(xe, xo, w: Int4Weight, group_sizes, dtype):
    """Expert by expert, chunk by chunk, the expert's rows tile by tile (see quant._grouped_tiles).

    Each expert's chunk is dequantised once for all its rows; an expert no row chose is skipped.
    """
    from . import quant

    n_exp, half, n_out = w.packed.shape
    hg = w.group_size // 2
    n_rows = xe.shape[0]
    tile = quant._tile_rows(n_rows, n_exp)
    rows = _chunk_rows(half, n_out, hg, chunk_elements=quant._grouped_chunk_elements(tile))
    n_chunks = half // rows
    pad = ((0, tile), (0, 0))
    xe = jnp.pad(xe, pad)
    xo = jnp.pad(xo, pad)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    n_tiles = (group_sizes + tile - 1) // tile
    in_tile = jnp.arange(tile)

    def expert(out, e):
        def chunk(out, i):
            pc = jax.lax.dynamic_slice(w.packed, (e, i * rows, 0), (1, rows, n_out))[0]
            even, odd = _halves(pc, _chunk_group_slice(w.scales, e, i * rows, rows, hg),
                                _chunk_group_slice(w.offsets, e, i * rows, rows, hg), dtype)

            def tile_step(k, out):
                r0 = starts[e] + k * tile
                xet = jax.lax.dynamic_slice(xe, (r0, i * rows), (tile, rows))
                xot = jax.lax.dynamic_slice(xo, (r0, i * rows), (tile, rows))
                keep = (r0 + in_tile < ends[e])[:, None]
                product = jnp.where(keep, xet @ even + xot @ odd, 0)
                return jax.lax.dynamic_update_slice_in_dim(
                    out, jax.lax.dynamic_slice_in_dim(out, r0, tile) + product, r0, 0)

            return jax.lax.fori_loop(0, n_tiles[e], tile_step, out), None

        out = jax.lax.cond(n_tiles[e] > 0, lambda o: jax.lax.scan(chunk, o, jnp.arange(n_chunks))[0],
                           lambda o: o, out)
        return out, None

    out, _ = jax.lax.scan(expert, jnp.zeros((n_rows + tile, n_out), dtype), jnp.arange(n_exp))
    return out[:n_rows]
