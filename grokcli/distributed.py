"""Multi-host runs through JAX's own distributed runtime.

Every process runs the same command; process 0 is the coordinator. `initialize` reads the
options or the environment variables JAX already understands (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, and the cluster auto-detection of SLURM / Open MPI), and
`quiet_unless_primary` keeps the terminal to process 0.
"""

from __future__ import annotations

import dataclasses
import os

from .errors import CoordinatorError, UsageError

DEFAULT_TIMEOUT_S = 60.0  # how long a process waits for the others to join

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class DistributedError(UsageError):
    """Inconsistent multi-host settings."""


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """Where to find the coordinator and who this process is."""

    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None  # processes taking part, one per host usually
    process_id: int | None = None  # this process's index, 0 .. num_processes - 1

    @property
    def enabled(self) -> bool:
        return self.coordinator is not None or (self.num_processes or 1) > 1


def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def resolve_options(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, environ=None) -> DistributedOptions:
    """Options first, then JAX's environment variables; checked for consistency."""
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID)
    opts = DistributedOptions(coordinator, num_processes, process_id)
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"invalid coordinator address {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
        if num_processes is None or process_id is None:
            raise DistributedError("multi-host needs --coordinator, --num-processes and --process-id together "
                                   f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    elif process_id is not None:
        raise DistributedError(f"--process-id {process_id} needs --coordinator HOST:PORT and --num-processes "
                               "(it is only meaningful when several processes run together)")
    elif (num_processes or 1) > 1:
        raise DistributedError(f"--num-processes {num_processes} needs --coordinator HOST:PORT (process 0's address)")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} must be in 0..{num_processes - 1}")
    return opts


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float | None = DEFAULT_TIMEOUT_S,
               on_wait=None) -> bool:
    """Join the distributed runtime when multi-host options are set; returns True when it did.

    Must run before anything touches the devices. Calling it again is harmless. On CPU the
    cross-process collectives use gloo (JAX's default).
    """
    opts = resolve_options(coordinator, num_processes, process_id)
    if not opts.enabled:
        return False
    import jax

    if is_initialized():
        return True
    kwargs = {}
    if timeout_s is not None:
        kwargs["initialization_timeout"] = max(1, int(timeout_s))
        if opts.process_id:
            # JAX aborts the whole process (a C++ fatal error) when it cannot connect: find out first.
            wait_for_coordinator(opts.coordinator, timeout_s, on_wait=on_wait)
    jax.distributed.initialize(coordinator_address=opts.coordinator, num_processes=opts.num_processes,
                               process_id=opts.process_id, **kwargs)
    return True


def wait_for_coordinator(address: str, timeout_s: float, *, on_wait=None, poll_s: float = 1.0) -> None:
    """Return once something accepts TCP connections at `address` (HOST:PORT); CoordinatorError
    naming it after `timeout_s`. `on_wait(seconds_waited)` is called about every 5 s while waiting."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    start = last_note = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(poll_s, 5.0)):
                return
        except OSError as e:
            reason = e.strerror or str(e)
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise CoordinatorError(f"cannot reach the coordinator {address} after {timeout_s:g} s ({reason}); "
                                   "is process 0 running, and is the address right? (--distributed-timeout "
                                   "waits longer)")
        if on_wait is not None and time.monotonic() - last_note >= 5:
            on_wait(waited)
            last_note = time.monotonic()
        time.sleep(min(poll_s, max(0.0, timeout_s - waited)))


def is_initialized() -> bool:
    """Whether this process has joined a distributed runtime."""
    import jax

    try:
        return bool(jax.distributed.is_initialized())
    except AttributeError:  # older jax
        from jax._src import distributed

        return distributed.global_state.client is not None


def process_index() -> int:
    """This process's index (0 when not distributed)."""
    import sys

    if "jax" not in sys.modules:
        return 0
    import jax

    return jax.process_index()


def process_count() -> int:
    """Processes taking part (1 when not distributed)."""
    import sys

    if "jax" not in sys.modules:
        return 1
    import jax

    return jax.process_count()


def broadcast_int(value: int) -> int:
    """Process 0's `value` on every process (e.g. a random seed each process drew on its own)."""
    if process_count() <= 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def is_primary() -> bool:
    """True on the process that writes to the terminal (process 0)."""
    return process_index() == 0


def quiet_unless_primary(*, keep_stderr: bool | None = None) -> bool:
    """On processes other than 0, send stdout (and stderr) to /dev/null; returns True if silenced.

    Every process generates the same text; only process 0 shows it. Set GROK_ALL_PROCESSES_STDERR=1
    to keep the other processes' stderr (progress and errors) for debugging.
    """
    if is_primary():
        _native_stdout_to_stderr()
        return False
    if keep_stderr is None:
        keep_stderr = os.environ.get("GROK_ALL_PROCESSES_STDERR", "") not in ("", "0")
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    streams = [(sys.stdout, 1)] + ([] if keep_stderr else [(sys.stderr, 2)])
    for stream, fd in streams:
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
        os.dup2(devnull, fd)
    os.close(devnull)
    return True


def _native_stdout_to_stderr() -> None:
    """Keep stdout for model text: native libraries' banners (gloo prints one per communicator to
    file descriptor 1) go to stderr, while Python's sys.stdout keeps writing to the real stdout."""
    import io
    import sys

    try:
        sys.stdout.flush()
        real = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError, AttributeError):
        return
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout = io.TextIOWrapper(io.FileIO(real, "w"), encoding=encoding, errors="replace",
                                  line_buffering=True, write_through=True)


__all__ = ["DistributedOptions", "DistributedError", "resolve_options", "initialize", "is_initialized",
           "process_index", "process_count", "broadcast_int", "is_primary", "quiet_unless_primary"]
