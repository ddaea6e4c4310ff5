"""The shapes a generation request runs in: batch size, prefill chunk and KV cache size.

Compiled steps are keyed by these shapes, so they come from a small fixed set: batch sizes are
powers of two, every prompt is prefilled in chunks of one size, and the cache is one of a few
sizes (`cache_sizes`). A session whose transcript grows from 100 to 8000 tokens then compiles
once per cache size, and any prompt length reuses the same prefill. `request_shape` is the one
rule; the engine, the memory planner's callers and the CLI all ask it.

Steps attend over the whole cache (its unwritten positions masked), so a cache bigger than a
request needs costs attention work: at most CONTEXT_GROWTH x. At Grok-1's width attention is a
small share of a step (a 512-token chunk over 8192 positions: ~8% of its FLOPs), so few sizes
(few compiles, each ~40 s at 64 layers before the layer scan) win; at a tiny width attention
dominates and a larger cache shows in the time to first token (benchmarks/bench_ttft.py).
"""

from __future__ import annotations

import dataclasses

from .config import ModelConfig
from .fsutil import format_bytes

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per prefill step, over all rows of a batch
MIN_ROW_CHUNK = 16  # the fewest tokens per row a prefill step takes
MIN_CONTEXT = 512  # the smallest KV cache: short requests of any length share one decode step
CONTEXT_GROWTH = 4  # each cache size is this many times the previous one
MAX_BATCH = 64  # the largest batch compiled; more prompts run in consecutive groups


@dataclasses.dataclass(frozen=True)
class RequestShape:
    """The compiled shapes of one request (one group of at most `batch` prompts)."""

    batch: int  # rows of the compiled steps: a power of two >= the prompts (padded rows are ignored)
    prefill_chunk: int  # prompt tokens each prefill step writes per row (the chunk shared by the rows)
    context: int  # KV cache positions per row: one of cache_sizes(cfg)

    def prefill_steps(self, tokens: int) -> int:
        """How many prefill steps `tokens` new prompt tokens of one row take."""
        return -(-tokens // self.prefill_chunk)


def cache_sizes(cfg: ModelConfig) -> tuple[int, ...]:
    """The KV cache sizes a request may use: MIN_CONTEXT x 4^k, and the model's whole context."""
    sizes, size = [], min(MIN_CONTEXT, cfg.sequence_len)
    while size < cfg.sequence_len:
        sizes.append(size)
        size *= CONTEXT_GROWTH
    return (*sizes, cfg.sequence_len)


def batch_size(rows: int) -> int:
    """The compiled batch for `rows` prompts: the smallest power of two >= rows."""
    if rows < 1:
        raise ValueError(f"a request needs at least one prompt, got {rows}")
    size = 1
    while size < rows:
        size *= 2
    return size


def request_shape(cfg: ModelConfig, *, rows: int = 1, prompt_tokens: int = 1, max_tokens: int | None = None,
                  prefill_chunk: int | None = None, min_context: int = 0) -> RequestShape:
    """The shape for `rows` prompts of up to `prompt_tokens` tokens and `max_tokens` new ones.

    `max_tokens=None` plans for the whole context. `min_context` keeps a cache at least that
    large (a prompt cache's, so a growing session never shrinks its cache and recompiles).
    The cache is the smallest of `cache_sizes` that holds prompt + new tokens (the largest when
    none does: generation then stops at the context's end).
    """
    chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"prefill_chunk must be an integer >= 1, got {chunk!r}")
    needed = cfg.sequence_len if max_tokens is None else max(prompt_tokens + max_tokens, min_context)
    context = next((size for size in cache_sizes(cfg) if size >= needed), cfg.sequence_len)
    batch = batch_size(rows)
    # The chunk is shared by the batch's rows: 64 short prompts then take 64 x 16 tokens a step,
    # not 64 x 512 (still one prefill executable per batch size).
    per_row = chunk if batch == 1 else max(min(MIN_ROW_CHUNK, chunk), chunk // batch)
    return RequestShape(batch=batch, prefill_chunk=min(per_row, context), context=context)


def batch_groups(rows: int, max_batch: int = MAX_BATCH) -> list[range]:
    """Prompt indices split into consecutive groups of at most `max_batch`."""
    return [range(start, min(start + max_batch, rows)) for start in range(0, rows, max_batch)]


def plan_request(cfg: ModelConfig, shape: RequestShape, mesh=(1, 1), *, dtype: str = "bfloat16",
                 device_memory: int | None = None):
    """The memory plan (`memory.plan_memory`) of a model serving requests of this shape."""
    from .memory import plan_memory

    return plan_memory(cfg, mesh, batch=shape.batch, context=shape.context, prefill_tokens=shape.prefill_chunk,
                       dtype=dtype, device_memory=device_memory)


def fit_request(cfg: ModelConfig, *, rows: int, prompt_tokens: int, max_tokens: int | None,
                prefill_chunk: int | None = None, min_context: int = 0, mesh=(1, 1), dtype: str = "bfloat16",
                device_memory: int | None = None, free_memory: int | None = None) -> RequestShape:
    """The shape to run `rows` prompts in: at most MAX_BATCH rows a group, fewer while memory is short.

    `device_memory` (bytes of one device) checks the whole plan, weights included; `free_memory`
    (bytes still free, the weights already loaded: a CPU's available RAM) checks the KV cache
    and activations. Neither given: no check. Raises MemoryPlanError, with the numbers, when
    even one prompt does not fit.
    """
    from .memory import MemoryPlanError, check_fits

    shape = request_shape(cfg, rows=min(rows, MAX_BATCH), prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                          prefill_chunk=prefill_chunk, min_context=min_context)
    while True:
        plan = plan_request(cfg, shape, mesh, dtype=dtype, device_memory=device_memory)
        request_bytes = plan.kv_cache_per_device + plan.activations_per_device
        fits = (plan.fits is not False) and (free_memory is None or request_bytes <= free_memory)
        if fits:
            return shape
        if shape.batch == 1:
            if plan.fits is False:
                check_fits(plan)
            raise MemoryPlanError(
                f"not enough memory for one prompt: the KV cache ({format_bytes(plan.kv_cache_per_device)}, "
                f"context {shape.context}) and activations ({format_bytes(plan.activations_per_device)}) need "
                f"{format_bytes(request_bytes)}, {format_bytes(free_memory)} is free; "
                f"try a smaller --max-tokens or --prefill-chunk")
        shape = dataclasses.replace(shape, batch=shape.batch // 2)


def free_host_memory() -> int | None:
    """Bytes the kernel says a new allocation can take without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read(1 << 16).splitlines():
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


__all__ = ["RequestShape", "request_shape", "cache_sizes", "batch_size", "batch_groups", "plan_request",
           "fit_request", "free_host_memory",
           "DEFAULT_PREFILL_CHUNK", "MIN_ROW_CHUNK", "MIN_CONTEXT", "CONTEXT_GROWTH", "MAX_BATCH"]
