"""`grok serve`: checks the options, then one library call (`grokcli.server.serve`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import app, usage_error
from .options import CheckpointOptions, CommonOptions, DeviceOptions, QuietOpt, load_model, with_option_groups

SERVER_PANEL = "Server"
LIMITS_PANEL = "Batching and limits"


def _template_names() -> str:
    from ..server.chat import TEMPLATES

    return ", ".join(TEMPLATES)


@app.command(rich_help_panel="Serve")
@with_option_groups
def serve(
    ckpt: CheckpointOptions = None,
    host: Annotated[str, typer.Option(
        "--host", envvar="GROK_HOST", rich_help_panel=SERVER_PANEL,
        help="Address to listen on. Anything but loopback needs --api-key or --allow-unauthenticated.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        "--port", envvar="GROK_PORT", min=0, max=65535, rich_help_panel=SERVER_PANEL,
        help="TCP port (0: a free one, printed on stderr).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="GROK_API_KEY", show_default=False, rich_help_panel=SERVER_PANEL,
        help="Require 'Authorization: Bearer KEY' on /v1/* (GROK_API_KEY keeps it off the command line).")] = None,
    allow_unauthenticated: Annotated[bool, typer.Option(
        "--allow-unauthenticated", rich_help_panel=SERVER_PANEL,
        help="Serve a non-loopback --host without an API key.")] = False,
    served_model_name: Annotated[Optional[str], typer.Option(
        "--served-model-name", show_default=False, rich_help_panel=SERVER_PANEL,
        help="The model id clients send. Default: 'demo' for --model demo, else 'grok-1'.")] = None,
    chat_template: Annotated[str, typer.Option(
        "--chat-template", rich_help_panel=SERVER_PANEL,
        help="How chat messages become a prompt: human-assistant (the REPL's 'Human:'/'Assistant:') "
             "or user-assistant.")] = "human-assistant",
    parallel: Annotated[Optional[int], typer.Option(
        "--parallel", min=1, max=256, show_default=False, rich_help_panel=LIMITS_PANEL,
        help="KV cache slots: sequences generated at once. Default: the most (up to 16) the memory plan "
             "fits; 4 when the device memory is unknown (CPU).")] = None,
    context: Annotated[Optional[int], typer.Option(
        "--context", min=2, show_default=False, rich_help_panel=LIMITS_PANEL,
        help="Tokens per slot (prompt + completion). Default: the model's sequence_len.")] = None,
    prefill_chunk: Annotated[int, typer.Option(
        "--prefill-chunk", min=1, rich_help_panel=LIMITS_PANEL,
        help="Prompt tokens prefilled per step, between the others' decode steps.")] = 128,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=0, rich_help_panel=LIMITS_PANEL,
        help="Sequences that may wait for a slot; beyond that: 503 with Retry-After.")] = 64,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", min=1, show_default=False, rich_help_panel=LIMITS_PANEL,
        help="The most max_tokens one request may ask for. Default: the context.")] = None,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", min=1024, rich_help_panel=LIMITS_PANEL,
        help="Larger request bodies are refused (413).")] = 2 * 2**20,
    shutdown_timeout: Annotated[float, typer.Option(
        "--shutdown-timeout", min=0, rich_help_panel=LIMITS_PANEL,
        help="Seconds requests in flight get to finish after Ctrl-C / SIGTERM.")] = 30.0,
    quiet: QuietOpt = False,
    devices: DeviceOptions = None,
    common: CommonOptions = None,
) -> None:
    """Serve the model over HTTP with the OpenAI API (completions, chat, models), many clients at once.

    Continuous batching: each request joins the running batch between two decode steps and leaves when done. Needs the server extra: pip install 'grokcli\\[serve]'. See docs/server.md.
    """
    from .. import server

    missing = server.missing_packages()
    if missing:
        raise usage_error(f"grok serve needs the server extra ({', '.join(missing)} not installed): "
                          f"{server.INSTALL_HINT}")
    from ..server.api import ServerSettings
    from ..server.chat import TEMPLATES
    from ..server.serving import ServeError, check_bind

    if chat_template not in TEMPLATES:
        raise usage_error(f"unknown --chat-template {chat_template!r}: choose one of {_template_names()}",
                          "--chat-template")
    if devices.multi_host or (devices.num_processes or 1) > 1:
        raise usage_error("grok serve runs on one host only: multi-host (--coordinator/--num-processes, "
                          "jax.distributed) serving is not supported; serve from one machine (see docs/multi-gpu.md)",
                          "--coordinator")
    try:
        check_bind(host, api_key, allow_unauthenticated)
    except ServeError as e:
        raise usage_error(str(e), "--host") from None
    resolved = ckpt.resolve()  # a bad --model / --checkpoint fails now, before the server starts
    name = served_model_name or ("demo" if ckpt.model == "demo" else "grok-1")
    settings = ServerSettings(model_name=name, api_key=api_key, chat_template=chat_template, max_tokens=max_tokens,
                              max_body_bytes=max_body_bytes)
    slots = parallel or _planned_parallel(resolved.checkpoint, devices, context, prefill_chunk)

    def load():
        model, tokenizer, _ = load_model(ckpt, devices, quiet=quiet, batch=slots, prompt_tokens=prefill_chunk,
                                         max_tokens=max(1, (context or 0) - prefill_chunk) if context else None)
        return model, tokenizer

    from ..server import EngineConfig

    server.serve(load=load, host=host, port=port, settings=settings, shutdown_timeout=shutdown_timeout,
                 engine_config=EngineConfig(parallel=slots, context=context, prefill_chunk=prefill_chunk,
                                            max_queue=max_queue),
                 log_level="warning" if quiet else "info")


def _planned_parallel(checkpoint, devices: DeviceOptions, context, prefill_chunk) -> int:
    from ..config import load_config
    from ..server.scheduler import plan_parallel

    import jax

    cfg = load_config(checkpoint)
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    mesh = devices.mesh or (f"1x{len(jax.devices())}" if len(jax.devices()) > 1 else None)
    return plan_parallel(cfg, mesh, context=context, prefill_chunk=prefill_chunk,
                         device_memory=devices.device_memory_bytes(), dtype=dtype)
