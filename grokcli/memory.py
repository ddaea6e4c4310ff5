"""The memory planner: bytes per device for weights, KV cache and activations, from shapes alone.

Weights and the KV cache are counted exactly as `sharding.py` lays them out (the same partition
rules, the same on-device dtypes as the loader: int8 weights, f32 scales, the embedding in the
activation dtype, f32 norms and router). Activations are an upper estimate of the largest
transient buffers of a prefill of the whole context. Nothing is allocated and no file is read.
"""

from __future__ import annotations

import dataclasses
import math

from .config import ModelConfig
from .errors import MemoryPlanError
from .fsutil import format_bytes
from .params import param_specs
from .sharding import DATA, MODEL, cache_partitions, leaf_bytes_per_device, param_partitions

# Kept free on every device for the runtime (CUDA context, XLA workspace, fragmentation).
RESERVE_FRACTION = 0.05
RESERVE_MIN_BYTES = 512 * 2**20


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What one model needs on each device of a mesh, and whether that fits."""

    mesh: tuple[int, int]  # (data, model) axis sizes
    batch: int  # sequences generated together
    context: int  # tokens of KV cache per sequence
    dtype: str  # activation / KV cache dtype
    weights_bytes: int  # one full copy of the parameters as placed on devices
    kv_cache_bytes: int  # the whole KV cache
    weights_per_device: int  # the largest share of the weights on one device
    kv_cache_per_device: int  # the largest share of the KV cache on one device
    activations_per_device: int  # estimated peak transient buffers on one device
    device_memory_bytes: int | None  # memory of one device (stated or detected); None = unknown

    @property
    def devices(self) -> int:
        return self.mesh[0] * self.mesh[1]

    @property
    def per_device_bytes(self) -> int:
        return self.weights_per_device + self.kv_cache_per_device + self.activations_per_device

    @property
    def usable_bytes(self) -> int | None:
        """Device memory minus the runtime's reserve."""
        if self.device_memory_bytes is None:
            return None
        reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * self.device_memory_bytes))
        return max(0, self.device_memory_bytes - reserve)

    @property
    def fits(self) -> bool | None:
        """True / False, or None when the device memory is unknown."""
        usable = self.usable_bytes
        return None if usable is None else self.per_device_bytes <= usable

    def summary(self) -> str:
        """One line: per-device need and what the devices hold."""
        d, m = self.mesh
        need = (f"{format_bytes(self.per_device_bytes)} per device on mesh {d}x{m} (weights {format_bytes(self.weights_per_device)}, "
                f"KV cache {format_bytes(self.kv_cache_per_device)}, activations {format_bytes(self.activations_per_device)}; "
                f"batch {self.batch}, context {self.context})")
        if self.device_memory_bytes is None:
            return need + "; device memory unknown (state it with --device-memory)"
        verdict = "fits" if self.fits else "does not fit"
        return (need + f"; {verdict} in {format_bytes(self.usable_bytes)} usable of {format_bytes(self.device_memory_bytes)} "
                f"per device")

    def advice(self) -> str:
        """What would help when the plan does not fit."""
        hints = []
        d, m = self.mesh
        if self.weights_per_device > (self.usable_bytes or 0):
            need = math.ceil(self.weights_bytes / max(1, self.usable_bytes or 1))
            hints.append(f"the weights alone need about {need}+ devices of this size on the model axis "
                         f"(more devices, or hosts: see docs/multi-gpu.md)")
            if d > 1:
                hints.append(f"--mesh 1x{d * m} instead of {d}x{m} (the data axis copies the weights)")
        else:
            hints.append("a smaller --batch or --context / --max-tokens")
        return "; ".join(hints)

    def to_json(self) -> dict:
        """The plan as a JSON-ready dict (totals and per-device bytes)."""
        return {
            "mesh": f"{self.mesh[0]}x{self.mesh[1]}", "devices": self.devices, "batch": self.batch,
            "context": self.context, "dtype": self.dtype,
            "weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
            "activations_bytes": self.activations_per_device * self.devices,
            # Across all devices: every device holds the same share (axes that do not divide are
            # replicated, the data axis copies the weights), so the total is per device x devices.
            "total_bytes": self.per_device_bytes * self.devices,
            "weights_per_device_bytes": self.weights_per_device,
            "kv_cache_per_device_bytes": self.kv_cache_per_device,
            "activations_per_device_bytes": self.activations_per_device,
            "per_device_bytes": self.per_device_bytes,
            "device_memory_bytes": self.device_memory_bytes, "usable_bytes": self.usable_bytes,
            "fits": self.fits,
        }


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def plan_memory(cfg: ModelConfig, mesh: tuple[int, int] | str = (1, 1), *, batch: int = 1,
                context: int | None = None, prefill_tokens: int | None = None, dtype: str = "bfloat16",
                device_memory: int | None = None) -> MemoryPlan:
    """Per-device bytes of `cfg` on a (data, model) mesh for `batch` sequences of `context` tokens.

    `prefill_tokens` is the longest prompt processed at once (default: the whole context);
    `dtype` the activation dtype (bfloat16 on accelerators, float32 on CPU); `device_memory`
    the bytes of one device (None: unknown, `fits` is then None).
    """
    from .sharding import parse_mesh_shape

    if isinstance(mesh, str):
        mesh = parse_mesh_shape(mesh)
    data, model = int(mesh[0]), int(mesh[1])
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    context = context or cfg.sequence_len
    mesh_shape = {DATA: data, MODEL: model}
    act = _itemsize(dtype)

    # Weights: exactly the loader's on-device layout.
    parts = param_partitions(cfg, mesh_shape)
    weights_total = weights_dev = largest_local_weight = 0
    for spec in param_specs(cfg):
        part = parts[(spec.name, spec.layer)]
        if spec.quantized:
            weights_total += math.prod(spec.shape) + 4 * math.prod(spec.scales_shape)
            local = leaf_bytes_per_device(spec.shape, 1, part["weight"], mesh_shape)
            weights_dev += local + leaf_bytes_per_device(spec.scales_shape, 4, part["scales"], mesh_shape)
            largest_local_weight = max(largest_local_weight, local)
        else:
            size = act if spec.name == "embed" else 4
            weights_total += size * math.prod(spec.shape)
            weights_dev += leaf_bytes_per_device(spec.shape, size, part["plain"], mesh_shape)

    # KV cache: keys and values in the activation dtype, plus the validity mask and lengths.
    kv_shape = (cfg.num_layers, batch, context, cfg.num_kv_heads, cfg.key_size)
    cparts = cache_partitions(cfg, batch, context, mesh_shape)
    kv_total = 2 * math.prod(kv_shape) * act + batch * context + 4 * batch
    kv_dev = (leaf_bytes_per_device(kv_shape, act, cparts["k"], mesh_shape)
              + leaf_bytes_per_device(kv_shape, act, cparts["v"], mesh_shape)
              + leaf_bytes_per_device((batch, context), 1, cparts["valid"], mesh_shape) + 4 * batch)

    # Activations of the prefill on one device (one layer live at a time); attention scores are
    # prompt x prompt because a prefill attends only among its own tokens.
    prompt = min(prefill_tokens or context, context)
    rows = batch // data if batch % data == 0 else batch
    tokens = rows * prompt
    q_split = model if cfg.num_q_heads % model == 0 else 1
    ffn_split = model if cfg.ffn_size % model == 0 else 1
    residual = tokens * cfg.emb_size * (6 * act + 2 * 4)  # h, norms (f32 inside), attention / MoE outputs
    qkv = tokens * (cfg.num_q_heads // q_split + 2 * cfg.num_kv_heads) * cfg.key_size * act
    scores = 2 * rows * (cfg.num_q_heads // q_split) * prompt * prompt * 4  # scores + softmax, f32
    moe = tokens * cfg.num_selected_experts * (3 * cfg.ffn_size // ffn_split * act + 2 * cfg.emb_size * act)
    dequantised = largest_local_weight * act  # one weight shard converted for its matmul
    sampling = batch * cfg.vocab_size * 4 * 6  # logits, probabilities, sort keys, masks
    activations = residual + qkv + scores + moe + dequantised + sampling

    return MemoryPlan(mesh=(data, model), batch=batch, context=context, dtype=dtype,
                      weights_bytes=weights_total, kv_cache_bytes=kv_total,
                      weights_per_device=weights_dev, kv_cache_per_device=kv_dev,
                      activations_per_device=activations, device_memory_bytes=device_memory)


def detected_device_memory() -> int | None:
    """The memory JAX's allocator may use on one device (GPUs, TPUs); None on CPU."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats: unknown, not an error
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


@dataclasses.dataclass(frozen=True)
class Reservation:
    """What generation will ask of the devices beyond the weights; `grokcli.load` checks it fits."""

    batch: int = 1  # sequences generated together
    prompt_tokens: int = 0  # the longest prompt in tokens (an upper bound is fine)
    max_tokens: int | None = None  # new tokens per sequence; None reserves the whole context
    prefill_chunk: int | None = None  # prompt tokens per prefill step (None: generation's default)


def plan_for_devices(cfg: ModelConfig, mesh, reservation: Reservation | None = None, *,
                     device_memory: int | None = None, dtype: str = "bfloat16") -> MemoryPlan:
    """The memory plan of `cfg` on `mesh` (a jax Mesh, "DATAxMODEL", (data, model) or None: one
    device) for `reservation`; `device_memory` None means as detected."""
    from .request_shape import MAX_BATCH, request_shape
    from .sharding import mesh_shape_dict, parse_mesh_shape

    r = reservation or Reservation()
    # The cache size and prefill chunk generation will use; batches of at most MAX_BATCH rows
    # (generation checks its padded batch again when it runs, and splits it if memory is short).
    run = request_shape(cfg, prompt_tokens=max(1, r.prompt_tokens), max_tokens=r.max_tokens,
                        prefill_chunk=r.prefill_chunk)
    batch = min(r.batch, MAX_BATCH)
    if mesh is None or hasattr(mesh, "devices"):
        shape = mesh_shape_dict(mesh)
        mesh = (shape[DATA], shape[MODEL])
    elif isinstance(mesh, str):
        mesh = parse_mesh_shape(mesh)
    if device_memory is None:
        device_memory = detected_device_memory()
    return plan_memory(cfg, mesh, batch=batch, context=run.context, prefill_tokens=run.prefill_chunk,
                       dtype=dtype, device_memory=device_memory)


def check_fits(plan: MemoryPlan) -> MemoryPlan:
    """Raise MemoryPlanError with the numbers when the plan does not fit; returns it otherwise."""
    if plan.fits is False:
        raise MemoryPlanError(f"not enough device memory: needs {plan.summary().split('; ', 1)[0]}, "
                              f"but each device has {format_bytes(plan.usable_bytes)} usable "
                              f"({format_bytes(plan.device_memory_bytes)} less the runtime's reserve); "
                              f"try {plan.advice()}")
    return plan


__all__ = ["MemoryPlan", "MemoryPlanError", "Reservation", "plan_memory", "plan_for_devices",
           "detected_device_memory", "check_fits",
           "RESERVE_FRACTION", "RESERVE_MIN_BYTES"]
