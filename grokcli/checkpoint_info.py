"""`inspect_checkpoint()`: what `grok info` shows, as data: config, size, devices, memory plan."""

from __future__ import annotations

import math

from .config import GROK_1, ModelConfig, load_config
from .layout import TOKENIZER_NAME, tensor_folder
from .paths import ResolvedCheckpoint


def inspect_checkpoint(resolved: ResolvedCheckpoint | None, *, mesh: tuple[int, int] | None = None,
                       batch: int = 1, context: int | None = None, device_memory: int | None = None,
                       list_devices: bool = True, config: ModelConfig | None = None) -> dict:
    """A JSON-ready description of a checkpoint and of the memory it needs on `mesh`.

    `resolved` None plans Grok-1 from its shapes alone (before any download): `config` (default
    the built-in Grok-1 preset) is used and nothing is read from disk. `mesh` None means
    model-parallel over the visible devices (one, with `list_devices=False`). `device_memory`
    None means as detected.
    """
    from .memory import detected_device_memory, plan_memory
    from .params import param_specs

    cfg = config or (load_config(resolved.checkpoint) if resolved is not None else GROK_1)
    specs = param_specs(cfg)
    files = []
    tokenizer = None
    if resolved is not None:
        files = sorted(p for p in tensor_folder(resolved.checkpoint).iterdir() if p.is_file())
        tok_path = resolved.tokenizer or (resolved.checkpoint / TOKENIZER_NAME)
        tokenizer = str(tok_path) if tok_path.is_file() else None

    backend, devices, cpu_matmul, cpu_matmul_detail = None, [], None, None
    if list_devices:
        import jax

        backend = jax.default_backend()
        devices = [str(d) for d in jax.devices()]
        if backend == "cpu":
            from .quant import cpu_matmul_report, cpu_matmul_status

            cpu_matmul = cpu_matmul_status()
            cpu_matmul_detail = cpu_matmul_report()
        if device_memory is None:
            device_memory = detected_device_memory()
    if mesh is None:
        mesh = (1, max(1, len(devices)))
    plan = plan_memory(cfg, mesh, batch=batch, context=context or cfg.sequence_len, device_memory=device_memory,
                       dtype="float32" if backend == "cpu" else "bfloat16")
    return {
        "checkpoint": str(resolved.checkpoint) if resolved is not None else None,
        "source": resolved.source if resolved is not None else "built-in Grok-1 config (from shapes; nothing downloaded)",
        "from_shapes": resolved is None,
        "config": cfg.to_json(),
        "parameters": sum(math.prod(s.shape) for s in specs),
        "files_expected": len(specs),
        "files_found": len(files),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "tokenizer": tokenizer,
        "backend": backend,
        "devices": devices,
        "cpu_matmul": cpu_matmul,
        "cpu_matmul_detail": cpu_matmul_detail,  # per shape class: the choice and the measured rates
        "memory": plan.to_json(),
    }
