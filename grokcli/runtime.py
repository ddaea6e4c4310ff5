"""Process-wide JAX set-up: the persistent compilation cache and the multi-host runtime.

Compiling the prefill and decode steps takes seconds (minutes for Grok-1 on many devices); with
the persistent cache a second process with the same model, buckets and devices loads the
compiled code from disk instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import paths

_state = {"compile_cache": None}  # the cache directory in use, or None


def default_compile_cache_dir() -> Path:
    """Where the CLI keeps compiled code: `<user cache dir>/grokcli/jax`."""
    return paths.cache_dir() / "jax"


def enable_compile_cache(path: str | Path | None = None) -> bool:
    """Turn on JAX's persistent compilation cache in `path` (default: the user cache directory).

    Every program is cached, however small or quick to compile (JAX's defaults skip programs
    that compile in under a second). Returns whether the cache is on: False when the directory
    cannot be created or written (a read-only home only costs compile time), after a warning.
    """
    import jax

    directory = Path(path) if path is not None else default_compile_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as e:
        import warnings

        warnings.warn(f"compilation cache disabled: cannot use {directory} ({e})", stacklevel=2)
        disable_compile_cache()  # never keep writing to a previously enabled directory instead
        return False
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor at all
    _reset_jax_cache()
    _state["compile_cache"] = directory
    return True


def disable_compile_cache() -> None:
    """Turn the persistent compilation cache off for this process (`--no-compile-cache`)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    _reset_jax_cache()
    _state["compile_cache"] = None


def compile_cache_dir() -> Path | None:
    """The persistent compilation cache directory in use, or None when grokcli has not enabled one."""
    return _state["compile_cache"]


def _reset_jax_cache() -> None:
    # JAX decides once per process whether to use the cache and opens it at most once; reset
    # that so a change made after something was already compiled takes effect.
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()


def configure(*, compile_cache: bool = True, coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, distributed_timeout_s: float | None = None) -> None:
    """Set up JAX for a CLI command: the compile cache on (or off) and, if asked, the multi-host runtime.

    The environment variable GROK_NO_COMPILE_CACHE (any value but "", "0", "false") also turns
    the cache off; the CLI's `--no-compile-cache` maps to `compile_cache=False`.
    """
    env_off = os.environ.get("GROK_NO_COMPILE_CACHE", "").strip().lower() not in ("", "0", "false", "no")
    if compile_cache and not env_off:
        enable_compile_cache()
    else:
        disable_compile_cache()
    from . import distributed

    # Options, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; every process runs
    # the same command and only process 0 writes to the terminal.
    def waiting(seconds: float) -> None:
        sys.stderr.write(f"waiting for the coordinator {coordinator or os.environ.get(distributed.ENV_COORDINATOR)} "
                         f"({seconds:.0f} s)\n")
        sys.stderr.flush()

    timeout = distributed.DEFAULT_TIMEOUT_S if distributed_timeout_s is None else distributed_timeout_s
    if distributed.initialize(coordinator, num_processes, process_id, timeout_s=timeout, on_wait=waiting):
        distributed.quiet_unless_primary()
