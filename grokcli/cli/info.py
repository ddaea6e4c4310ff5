"""`grok info`: one library call (`inspect_checkpoint`), rendered."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .app import app
from .options import (DEVICE_PANEL, CheckpointOptions, CommonOptions, DeviceMemoryOpt, JsonOpt, MeshOpt,
                      parse_bytes, parse_mesh, with_option_groups)


@app.command(rich_help_panel="Inspect")
@with_option_groups
def info(
    ckpt: CheckpointOptions = None,
    json_out: JsonOpt = False,
    memory: Annotated[bool, typer.Option(
        "--memory", rich_help_panel=DEVICE_PANEL,
        help="Show the memory plan per device and whether it fits.")] = False,
    batch: Annotated[int, typer.Option("--batch", min=1, rich_help_panel=DEVICE_PANEL,
                                       help="Batch size for the memory estimate.")] = 1,
    context: Annotated[Optional[int], typer.Option(
        "--context", min=1, show_default=False, rich_help_panel=DEVICE_PANEL,
        help="Context length for the memory estimate. Default: the model's sequence_len.")] = None,
    mesh: MeshOpt = None,
    device_memory: DeviceMemoryOpt = None,
    no_devices: Annotated[bool, typer.Option(
        "--no-devices", rich_help_panel=DEVICE_PANEL,
        help="Do not start JAX to list devices (faster; the backend is not shown).")] = False,
    common: CommonOptions = None,
) -> None:
    """Show the resolved checkpoint, its config, size, the JAX devices and the memory it needs.

    `--model grok-1` before Grok-1 is downloaded plans from its shapes alone: will it fit?
    """
    from .. import tui
    from ..checkpoint_info import inspect_checkpoint

    try:
        resolved = ckpt.resolve()
    except UsageError:
        if ckpt.model != "grok-1":
            raise
        resolved = None  # not downloaded yet: the built-in config says what it would need
    info_obj = inspect_checkpoint(
        resolved, mesh=parse_mesh(mesh) if mesh is not None else None, batch=batch, context=context,
        device_memory=parse_bytes(device_memory, "--device-memory") if device_memory else None,
        list_devices=not no_devices)
    if json_out:
        sys.stdout.write(json.dumps(info_obj, indent=2) + "\n")
        return
    tui.print_info(info_obj, show_memory=memory)
