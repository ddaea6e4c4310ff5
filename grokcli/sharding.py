"""The device mesh and the one table of partition rules.

A mesh has two axes: "data" (batch rows are split over it; weights are replicated along it)
and "model" (weights, the KV cache and the vocabulary are split over it). Every placement in
grokcli (parameters, KV cache, batch inputs) and the memory planner derive their layout from
`PARTITION_RULES` and the logical axis names declared in `params.py`.

Dimensions that do not divide an axis's size are never split unevenly: the rule falls back to
another dimension of the same array, and replicates when none divides.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .config import ModelConfig
from .errors import UsageError
from .params import ParamSpec

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)


class MeshError(UsageError):
    """A mesh that the visible devices cannot form."""

    def __init__(self, message: str):
        super().__init__(message, option="--mesh")


# ---------------------------------------------------------------------------------------------
# The table. For each mesh axis, the logical axes that may be split over it, in order of
# preference; an array gets the mesh axis on its first dimension (in this order) whose size
# divides the axis. `primary` axes are the reason an array is split at all; `fallback` axes are
# used only for arrays that have a primary axis which does not divide (a 6-GPU mesh with 8 kv
# heads, say). Arrays with no primary axis (norm scales, the router) are replicated.
#
#   q_heads / kv_heads: attention heads (split at head boundaries)
#   ffn: each expert's hidden width (experts stay whole on every device: decode reads 2 of 8)
#   vocab: the (tied) embedding table
#   emb / expert: fallbacks for big matrices; head_dim / context: fallbacks for the KV cache

PARTITION_RULES: dict[str, dict[str, tuple[str, ...]]] = {
    MODEL: {"primary": ("ffn", "q_heads", "kv_heads", "vocab"),
            "fallback": ("emb", "expert", "head_dim", "context")},
    DATA: {"primary": ("batch",), "fallback": ()},
}

# Logical axes of the KV cache's arrays (model.KVCache field order).
CACHE_AXES = {
    "k": ("layers", "batch", "context", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "context", "kv_heads", "head_dim"),
    "valid": ("batch", "context"),
    "lengths": ("batch",),
}


def _units(axis: str, size: int, cfg: ModelConfig | None) -> int:
    """How many indivisible units a dimension holds: heads for head axes (never split a head)."""
    if cfg is not None and axis == "q_heads":
        return cfg.num_q_heads
    if cfg is not None and axis == "kv_heads":
        return cfg.num_kv_heads
    return size


def partition(axes: Sequence[str], shape: Sequence[int], mesh_shape: dict[str, int],
              cfg: ModelConfig | None = None) -> tuple:
    """Mesh axis (or None) for each dimension of an array with these logical axes and shape.

    `mesh_shape` maps mesh axis name -> size. The result can be passed to PartitionSpec(*...).
    """
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} axis names for a {len(shape)}-d shape")
    if len(set(axes)) != len(axes):
        raise ValueError(f"logical axes repeat in {axes}: two dimensions would land on one mesh axis")
    out: list[str | None] = [None] * len(axes)
    for mesh_axis, rules in PARTITION_RULES.items():
        size = mesh_shape.get(mesh_axis, 1)
        if size <= 1 or not any(a in rules["primary"] for a in axes):
            continue
        for logical in rules["primary"] + rules["fallback"]:
            if logical in axes:
                dim = axes.index(logical)
                if out[dim] is None and _units(logical, shape[dim], cfg) % size == 0:
                    out[dim] = mesh_axis
                    break
    return tuple(out)


def scales_partition(spec: ParamSpec, weight_part: tuple, mesh_shape: dict[str, int]) -> tuple:
    """Partition of a quantized leaf's scales `[..., row_blocks, out]` given its weight's.

    Leading and output dimensions follow the weight. The row-block dimension follows the weight's
    input dimension only when the blocks divide evenly over it (the release's 8 blocks on 1, 2, 4
    or 8 shards: each device then holds exactly the blocks of its rows); otherwise the scales are
    replicated along it (they are 1/rows_per_block the size of the weight, so that is cheap).
    """
    out = list(weight_part)
    axis = weight_part[-2]
    if axis is not None and spec.row_blocks % mesh_shape.get(axis, 1) != 0:
        out[-2] = None
    return tuple(out)


def param_partitions(cfg: ModelConfig, mesh_shape: dict[str, int]) -> dict[tuple[str, int | None], dict]:
    """`{(name, layer): {"weight"|"plain": part, "scales": part}}` for every leaf of a config."""
    from .params import param_specs

    out = {}
    for spec in param_specs(cfg):
        part = partition(spec.axes, spec.shape, mesh_shape, cfg)
        if spec.quantized:
            out[(spec.name, spec.layer)] = {"weight": part, "scales": scales_partition(spec, part, mesh_shape)}
        else:
            out[(spec.name, spec.layer)] = {"plain": part}
    return out


def cache_partitions(cfg: ModelConfig, batch: int, context: int, mesh_shape: dict[str, int]) -> dict[str, tuple]:
    """Partition of each KV cache array (keys of CACHE_AXES) for a batch and context."""
    shapes = {
        "k": (cfg.num_layers, batch, context, cfg.num_kv_heads, cfg.key_size),
        "v": (cfg.num_layers, batch, context, cfg.num_kv_heads, cfg.key_size),
        "valid": (batch, context),
        "lengths": (batch,),
    }
    return {name: partition(CACHE_AXES[name], shapes[name], mesh_shape) for name in CACHE_AXES}


def shard_shape(shape: Sequence[int], part: Sequence, mesh_shape: dict[str, int]) -> tuple[int, ...]:
    """The shape of one device's shard."""
    return tuple(n // (mesh_shape.get(a, 1) if a else 1) for n, a in zip(shape, part))


# ---------------------------------------------------------------------------------------------
# Meshes.


def parse_mesh_shape(text: str) -> tuple[int, int]:
    """'DATAxMODEL' (e.g. '1x8', '2x4') -> (data, model); MeshError otherwise."""
    parts = str(text).strip().lower().replace("*", "x").split("x")
    try:
        data, model = (int(p) for p in parts)
    except ValueError:
        raise MeshError(f"invalid mesh {text!r}: expected DATAxMODEL, e.g. 1x8") from None
    if data < 1 or model < 1:
        raise MeshError(f"invalid mesh {text!r}: both sizes must be >= 1")
    return data, model


def mesh_suggestions(num_devices: int) -> list[str]:
    """Every DATAxMODEL that uses exactly `num_devices` devices, model-parallel first."""
    return [f"{num_devices // m}x{m}" for m in range(num_devices, 0, -1) if num_devices % m == 0]


def check_mesh_shape(shape: tuple[int, int], devices: Sequence) -> None:
    """Raise MeshError unless the devices can form `shape`; the message says what would work.

    One process may use the first DATA*MODEL of its devices; several processes must use them all
    (every process takes part in every step).
    """
    data, model = shape
    n = len(devices)
    processes = len({getattr(d, "process_index", 0) for d in devices})
    if data * model == n or (data * model < n and processes == 1):
        return
    kinds = sorted({getattr(d, "platform", "device") for d in devices})
    found = f"{n} {'/'.join(kinds)} device{'s' if n != 1 else ''}"
    if processes > 1:
        found += f" across {processes} processes"
    verb = "is" if n == 1 and processes == 1 else "are"
    raise MeshError(f"mesh {data}x{model} needs {data * model} devices but {found} {verb} visible; "
                    f"use one of: {', '.join(mesh_suggestions(n)[:6])}")


def make_mesh(shape: str | tuple[int, int] | None = None, devices: Sequence | None = None):
    """A `jax.sharding.Mesh` with axes ("data", "model") over all visible devices.

    `shape` is 'DATAxMODEL' or a (data, model) tuple; None means model-parallel over every
    device (1xN). Checked against the devices before anything else happens.
    """
    import jax
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    if shape is None:
        shape = (1, len(devices))
    elif isinstance(shape, str):
        shape = parse_mesh_shape(shape)
    shape = (int(shape[0]), int(shape[1]))
    check_mesh_shape(shape, devices)
    devices = devices[: shape[0] * shape[1]]
    if len({d.process_index for d in devices}) > 1:
        # Across hosts: each host's devices contiguous, so a data row is one host when DATA = hosts.
        grid = np.array(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object).reshape(shape)
    else:
        try:
            # Orders devices so that neighbours on the model axis share the fastest links.
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except Exception:  # noqa: BLE001 - topologies mesh_utils does not know: plain order
            grid = np.array(devices, dtype=object).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES)


def mesh_shape_dict(mesh) -> dict[str, int]:
    """`{"data": d, "model": m}` of a Mesh (or 1x1 for None)."""
    if mesh is None:
        return {DATA: 1, MODEL: 1}
    return {name: int(size) for name, size in mesh.shape.items()}


# ---------------------------------------------------------------------------------------------
# Placement.


def named(mesh, part: Sequence):
    """NamedSharding of a partition tuple."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*part))


def replicated(mesh):
    """The fully replicated sharding of a mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def put(array, sharding):
    """A host array -> a global jax.Array, each device receiving only its own slice.

    Works across processes: every process passes the same host array and places the shards of
    its own devices (`jax.make_array_from_callback`).
    """
    import jax

    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def batch_part(shape: Sequence[int], mesh) -> tuple:
    """Leading (batch) dimension along "data" when it divides, everything else replicated."""
    axes = ("batch",) + tuple(f"_{i}" for i in range(1, len(shape)))
    return partition(axes, shape, mesh_shape_dict(mesh)) if shape else ()


def put_batch(tree, mesh):
    """Place a pytree of host arrays whose leading dimension is the batch (see batch_part)."""
    import jax

    return jax.tree.map(lambda x: put(x, named(mesh, batch_part(np.shape(x), mesh))), tree)


def make_placer(cfg: ModelConfig, mesh):
    """The `place(spec, array, part)` hook of `loader.to_device_leaf` for this mesh."""
    parts = param_partitions(cfg, mesh_shape_dict(mesh))

    def place(spec: ParamSpec, array, part: str):
        return put(array, named(mesh, parts[(spec.name, spec.layer)][part]))

    return place


def cache_shardings(cfg: ModelConfig, batch: int, context: int, mesh):
    """A KVCache of NamedShardings for a batch and context on this mesh."""
    from .model import KVCache

    parts = cache_partitions(cfg, batch, context, mesh_shape_dict(mesh))
    return KVCache(**{name: named(mesh, part) for name, part in parts.items()})


def init_cache(cfg: ModelConfig, batch: int, context: int, dtype=None, mesh=None):
    """An empty KV cache, created directly in its sharded layout (no device holds all of it)."""
    import jax

    from . import model as model_fn

    if mesh is None:
        return model_fn.init_cache(cfg, batch, context, dtype)
    dtype = dtype or model_fn.compute_dtype_for_backend()
    make = jax.jit(lambda: model_fn.init_cache(cfg, batch, context, dtype),
                   out_shardings=cache_shardings(cfg, batch, context, mesh))
    return make()


def leaf_bytes_per_device(shape: Sequence[int], itemsize: int, part: Sequence, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of an array with this partition."""
    return math.prod(shard_shape(shape, part, mesh_shape)) * itemsize


__all__ = ["DATA", "MODEL", "MESH_AXES", "MeshError", "PARTITION_RULES", "CACHE_AXES", "partition",
           "scales_partition", "param_partitions", "cache_partitions", "shard_shape", "parse_mesh_shape",
           "mesh_suggestions", "check_mesh_shape", "make_mesh", "mesh_shape_dict", "named",
           "replicated", "put", "batch_part", "put_batch", "make_placer",
           "cache_shardings", "init_cache", "leaf_bytes_per_device"]
