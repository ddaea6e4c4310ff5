"""The native CPU int8 matmul (`qmatmul.cc`): built on first use with the system C++ compiler.

On a CPU, XLA converts int8 weights to float at ~6 GB/s on one thread; the kernel streams them at
the memory's pace on every core of XLA's thread pool (benchmarks/README.md). It is built once per
machine into the user cache directory (keyed by its source, the compiler, the flags, jaxlib and
the CPU, so a cache shared between different machines never loads a foreign build) and
registered with XLA as an FFI target.

Nothing is required: without a C++ compiler, when the build fails, or with GROK_NATIVE_KERNELS=0,
grokcli uses its XLA:CPU loops instead (`status()` says which and why).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .. import paths
from . import select
from ..errors import NativeBuildError

TARGET = "grokcli_qmatmul"
SOURCE = Path(__file__).with_name("qmatmul.cc")
ENV_SWITCH = "GROK_NATIVE_KERNELS"
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict = {"usable": None, "reason": "", "library": None}  # reason: why a setup failed


def disabled_by_env() -> bool:
    """True when GROK_NATIVE_KERNELS is 0 / false / no / off."""
    return select.forced() == "xla"


def compiler() -> list[str] | None:
    """The C++ compiler command: $CXX, else the first of c++, g++, clang++ on PATH; None if none."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def compile_flags() -> list[str]:
    """Optimisation flags for this CPU (the build is only ever loaded on a CPU like this one)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        # Full-width vectors where the CPU has them: the conversion loop is ~1.4x faster with
        # 512-bit than with GCC's default 256-bit preference on AVX-512 machines.
        arch = ["-march=native"] + (["-mprefer-vector-width=512"] if "avx512f" in _cpu_flags() else [])
    elif machine in ("arm64", "aarch64"):
        arch = ["-mcpu=native"]
    else:
        arch = ["-march=native"]
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", *arch]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_identity() -> str:
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
    except OSError:
        pass
    return text


def library_path(cxx: list[str], flags: list[str]) -> Path:
    """Where the build for this source, compiler, flags, jaxlib and CPU lives in the cache."""
    import jaxlib

    try:
        version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"cannot run the C++ compiler {cxx[0]}: {e}") from None
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(), jaxlib.__version__.encode(),
                 _cpu_identity().encode()):
        h.update(part)
        h.update(b"\0")
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    return paths.cache_dir() / "native" / f"qmatmul-{h.hexdigest()[:16]}{suffix}"


def build(flags: list[str] | None = None) -> Path:
    """Compile the kernel into the cache (once; later calls find it there) and return its path.

    `flags` replaces `compile_flags()` (tests and benchmarks build e.g. an AVX2-only variant).
    """
    import jax

    cxx = compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")
    flags = compile_flags() if flags is None else flags
    target = library_path(cxx, flags)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeBuildError(f"cannot create {target.parent}: {e}") from None
    # Compiled to a private name and renamed: a concurrent process or an interrupted build never
    # leaves a partial library under the final name.
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*cxx, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise NativeBuildError(f"C++ compiler {cxx[0]} failed to run: {e}") from None
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines() or ["?"]
            raise NativeBuildError(f"{cxx[0]} could not compile {SOURCE.name}: {lines[0].strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def register(library: Path, target: str = TARGET) -> None:
    """Load a kernel build and register it with XLA as the FFI target `target`."""
    import ctypes

    import jax

    try:
        lib = ctypes.CDLL(str(library))
        handler = lib.GrokcliQMatmul
    except (OSError, AttributeError) as e:
        raise NativeBuildError(f"cannot load {library}: {e}") from None
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")


def _load() -> None:
    library = build()
    register(library)
    _state["library"] = library


def usable() -> bool:
    """Whether the native kernel can be used in this process (built and registered on first call).

    False, with the reason in `status()`, when disabled by GROK_NATIVE_KERNELS, when no compiler
    is found, or when the build fails; the caller then uses its XLA loops. A failed build is not
    retried in the same process.
    """
    if disabled_by_env():
        return False
    with _lock:
        if _state["usable"] is None:
            try:
                _load()
                _state["usable"] = True
            except NativeBuildError as e:
                _state["usable"], _state["reason"] = False, str(e)
            except Exception as e:  # an optional speed-up: anything else (an old jax without
                # jax.ffi, a registration error) also means the XLA loops, never a failed run
                _state["usable"], _state["reason"] = False, f"{type(e).__name__}: {e}"
        return _state["usable"]


def chosen_for(rows: int) -> bool:
    """Whether a matmul call of `rows` rows uses the kernel: usable, and faster than the XLA
    loops for its shape class as measured on this machine (select.py), unless GROK_NATIVE_KERNELS
    forces a side."""
    if not usable():
        return False
    if select.forced() == "native":
        return True
    d = select.decision(_state["library"])
    return d["classes"][select.shape_class(rows)]["choice"] == "native"


def report() -> dict:
    """What runs and why, as data: kernel on/off (library or reason), forced or measured, and per
    shape class the choice with the measured times (ms per call) and rates (GB/s of int8)."""
    forced = select.forced()
    out: dict = {"kernel": None, "library": None, "reason": None, "forced": forced, "classes": None}
    if forced == "xla":
        out.update(kernel="off", reason=f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}")
        return out
    if _state["usable"] is None:
        out.update(kernel="not tried", reason="built on first use on a CPU")
        return out
    if not _state["usable"]:
        out.update(kernel="off", reason=_state["reason"])
        return out
    out.update(kernel="on", library=str(_state["library"]))
    if forced is None:
        d = select.decision(_state["library"])
        out["classes"] = d["classes"]
        out["calibration_s"] = d.get("calibration_s")
    return out


def status() -> str:
    """One line: which int8 matmul runs for each shape class, and why."""
    r = report()
    if r["kernel"] != "on":
        return f"native int8 matmul: {r['kernel']} ({r['reason']}); using XLA loops"
    if r["forced"] == "native":
        return f"native int8 matmul: on for every shape ({ENV_SWITCH}={os.environ[ENV_SWITCH]}; {r['library']})"
    parts = []
    for name, c in r["classes"].items():
        rate = (f"{c['native_gb_s']:.1f} vs {c['xla_gb_s']:.1f} GB/s" if "native_gb_s" in c
                else f"{c['native_ms']:.2f} vs {c['xla_ms']:.2f} ms")
        parts.append(f"{name} {c['choice']} ({rate})")
    return "native int8 matmul: chosen by measurement (native vs XLA loops): " + ", ".join(parts)


def qmatmul_rows(x, weight, scales, experts, target: str = TARGET):
    """y[n] = x[n] @ (weight[experts[n]] * scales[experts[n]]) through the kernel (inside jit).

    x f32 [N, K]; weight int8 [E, K, M]; scales f32 [E, B, M] (row b applies to input rows
    [b*K/B, (b+1)*K/B)); experts int32 [N], each in [0, E). Returns f32 [N, M].
    """
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct((x.shape[0], weight.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x, weight, scales, experts)
