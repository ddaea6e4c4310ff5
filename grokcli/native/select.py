"""Which CPU int8 matmul runs, per shape class: decided by timing both on this machine once.

The native kernel is not faster everywhere (an AVX2 machine measured it at 0.6x the XLA loops
before its AVX2 tiling was fixed), so on first use the kernel and the XLA loops of `quant.py` are
timed on one representative call of each shape class and the faster one is chosen per class. The
decision is cached next to the kernel build (same key: source, compiler, flags, jaxlib, CPU), so
a new build, a new compiler or another CPU measures again; `GROK_NATIVE_KERNELS=0/1` forces
either without measuring.

Classes, by the number of (token, expert) rows one matmul call multiplies: decode at batch 1
(1-2 rows: the attention projections and the two selected experts), decode of a small batch
(up to 32 rows: batch 8 x 2 experts), prefill (more rows, grouped by expert).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

CLASSES = ("decode-1", "decode-8", "prefill")
_VERSION = 1  # of the calibration procedure and the file's layout: a change re-measures
_SLICE_S = 0.15  # time budget per class (both variants) (the whole calibration stays ~1-2 s)
_K, _M = 1024, 4096  # one calibration expert: 4 MiB of int8

_lock = threading.Lock()
_decision: dict | None = None  # the decision in effect in this process (loaded or measured)


def shape_class(rows: int) -> str:
    """The class of a matmul call multiplying `rows` rows of x (static at trace time)."""
    if rows <= 4:
        return "decode-1"
    if rows <= 32:
        return "decode-8"
    return "prefill"


def forced() -> str | None:
    """'native' or 'xla' when GROK_NATIVE_KERNELS forces one; None when measured."""
    from . import ENV_SWITCH

    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "xla"
    if value in ("1", "true", "yes", "on"):
        return "native"
    return None


def decision_path(library: Path) -> Path:
    """The cached decision for one kernel build (invalidated with it: the name carries its key)."""
    return library.with_name(library.stem + ".choice.json")


def _last_level_cache_bytes() -> int:
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in base.glob("index*"):
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KM")) * scale)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def _experts_in_stack() -> int:
    """Enough calibration experts that the decode cases stream from memory, not from the cache."""
    need = 2 * _last_level_cache_bytes() / (_K * _M)
    return int(min(64, max(8, math.ceil(need))))


def _cases():
    """Per class: (native callable, XLA-loops callable, weight bytes per call), all compiled."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from .. import quant

    n_exp = _experts_in_stack()
    w = quant.QuantizedWeight(jnp.ones((n_exp, _K, _M), jnp.int8), jnp.full((n_exp, 1, _M), 0.01, jnp.float32))
    jax.block_until_ready(w)
    rng = np.random.default_rng(0)
    cases = {}

    def rows_of(n):
        return jnp.asarray(rng.standard_normal((n, _K)).astype(np.float32))

    # decode at batch 1 and 8: gathered experts, each call a different slice of the stack
    for cls, n, distinct in (("decode-1", 2, 2), ("decode-8", 16, 8)):
        x = rows_of(n)
        calls = [jnp.asarray((np.arange(n) // (n // distinct) + i * distinct) % n_exp, jnp.int32)
                 for i in range(max(1, n_exp // distinct))]
        native = jax.jit(lambda x, w, e: quant._native(x, w, e, jnp.float32))
        xla = jax.jit(lambda x, w, e: quant._gathered(x, w, e, jnp.float32))
        cases[cls] = tuple(_cycling(f, x, w, calls) for f in (native, xla)) + (distinct * _K * _M,)
    # prefill: 64 rows sorted by expert, 16 per expert over 4 experts (a grouped matmul)
    x = rows_of(64)
    experts = jnp.asarray(np.repeat(np.arange(4), 16), jnp.int32)
    sizes = jnp.full((4,), 16, jnp.int32)
    w4 = quant.QuantizedWeight(w.weight[:4], w.scales[:4])
    native = jax.jit(lambda x, w, e: quant._native(x, w, e, jnp.float32))
    xla = jax.jit(lambda x, w, e, g: quant._grouped(x, w, g, e, jnp.float32))
    cases["prefill"] = (lambda: native(x, w4, experts), lambda: xla(x, w4, experts, sizes), 4 * _K * _M)
    return cases


def _cycling(fn, x, w, calls):
    state = {"i": 0}

    def run():
        e = calls[state["i"] % len(calls)]
        state["i"] += 1
        return fn(x, w, e)

    return run


def _race(native: Callable, xla: Callable, budget_s: float) -> dict[str, float]:
    """Best seconds per call of each, calls alternated (a burst of load hits both), after one
    compiling call each; at least 3 and at most 20 pairs, stopping once `budget_s` is spent."""
    native().block_until_ready()
    xla().block_until_ready()
    best = {"native": math.inf, "xla": math.inf}
    end = time.perf_counter() + budget_s
    for i in range(20):
        for name, fn in ((("native", native), ("xla", xla)) if i % 2 == 0 else (("xla", xla), ("native", native))):
            t0 = time.perf_counter()
            fn().block_until_ready()
            best[name] = min(best[name], time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > end:
            break
    return best


def measure() -> dict[str, dict[str, float]]:
    """Seconds per call of each class's representative matmul, native and XLA loops."""
    cases = _cases()
    out = {}
    for cls in CLASSES:
        native, xla, nbytes = cases[cls]
        out[cls] = {**_race(native, xla, _SLICE_S), "bytes": float(nbytes)}
    return out


def _in_fresh_thread(fn):
    """Run `fn` in a new thread: calibration may be reached while jax traces a step, and jax's
    trace state is per thread, so the timed calls run eagerly there instead of being staged."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            result["error"] = e

    t = threading.Thread(target=target, name="grokcli-native-calibration")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def calibrate(library: Path, timings: Callable[[], dict] | None = None) -> dict:
    """Measure (or take `timings()`, for tests), decide per class, write the decision atomically."""
    from ..fsutil import atomic_write_text

    t0 = time.perf_counter()
    measured = (timings or (lambda: _in_fresh_thread(measure)))()
    classes = {}
    for cls in CLASSES:
        m = measured[cls]
        choice = "native" if m["native"] <= m["xla"] else "xla"
        entry = {"choice": choice, "native_ms": m["native"] * 1e3, "xla_ms": m["xla"] * 1e3}
        if m.get("bytes"):
            entry.update(native_gb_s=m["bytes"] / m["native"] / 1e9, xla_gb_s=m["bytes"] / m["xla"] / 1e9)
        classes[cls] = entry
    decision = {"version": _VERSION, "library": library.name, "classes": classes,
                "calibration_s": round(time.perf_counter() - t0, 3), "load_average": _load_average(),
                "cpus": os.cpu_count() or 1}
    try:
        atomic_write_text(decision_path(library), json.dumps(decision, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache: the decision holds for this process and is measured again next time
    return decision


def _load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


def _busy(load: float) -> bool:
    return load > (os.cpu_count() or 1)


def _read(library: Path) -> dict | None:
    try:
        d = json.loads(decision_path(library).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(d, dict) and d.get("version") == _VERSION and d.get("library") == library.name
          and isinstance(d.get("classes"), dict)
          and all(isinstance(d["classes"].get(c), dict) and d["classes"][c].get("choice") in ("native", "xla")
                  for c in CLASSES))
    if not ok:
        return None
    # Measured on a busy machine (more runnable threads than CPUs): kept, but measured again by a
    # later process that finds the machine quieter, so one noisy minute does not decide for good.
    if _busy(float(d.get("load_average") or 0)) and not _busy(_load_average()):
        return None
    return d


def decision(library: Path, timings: Callable[[], dict] | None = None) -> dict:
    """The per-class decision for this kernel build: cached in this process, then on disk, else measured."""
    global _decision
    with _lock:
        if _decision is None or _decision.get("library") != library.name:
            _decision = _read(library) or calibrate(library, timings)
        return _decision


def reset() -> None:
    """Forget the decision held by this process (the file stays); for tests."""
    global _decision
    with _lock:
        _decision = None


def current() -> dict | None:
    """The decision in effect in this process, if one was loaded or measured."""
    return _decision
