"""Two processes on 127.0.0.1 joined by jax.distributed (gloo CPU collectives), 4 simulated devices
each, load one checkpoint on a 1x8 mesh spanning both and generate the same greedy tokens as one
process with 8 devices. Every process is killed when the test ends, whatever happens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from grokcli.distributed import DistributedError, resolve_options

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS") and not k.startswith("JAX_COORDINATOR")}
    env["GROK_TEST_DEVICES"] = str(devices)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # halves compile time; sharding is still partitioned by XLA
    return env


def test_two_processes_generate_what_one_process_generates(tmp_path, tiny_config, tiny_checkpoint):
    cfg = tiny_config(num_layers=2, num_q_heads=8, num_kv_heads=4)
    ckpt = tiny_checkpoint(cfg, seed=3)
    worker = str(TESTS / "multihost_worker.py")
    coordinator = f"127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"process{i}.json" for i in range(2)] + [tmp_path / "single.json"]
    commands = [[sys.executable, worker, str(ckpt), "1x8", str(outs[i]), coordinator, "2", str(i)] for i in range(2)]
    commands.append([sys.executable, worker, str(ckpt), "1x8", str(outs[2])])
    logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(3)]
    procs = []
    try:
        for i, cmd in enumerate(commands):
            procs.append(subprocess.Popen(cmd, stdout=logs[i], stderr=subprocess.STDOUT,
                                          env=_env(4 if i < 2 else 8), start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until the deadline
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = []
    for i, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- process {i}:\n" + "".join(line for line in log.read().splitlines(True)
                                                 if "[Gloo]" not in line)[-3000:])
        log.close()
    assert codes == [0, 0, 0], f"exit codes {codes} (None: killed at the {TIMEOUT_S} s limit)\n" + "\n".join(text)

    results = [json.loads(p.read_text()) for p in outs]
    assert [r["process_index"] for r in results] == [0, 1, 0]
    assert [(r["process_count"], r["devices"], r["local_devices"]) for r in results] == [(2, 8, 4), (2, 8, 4), (1, 8, 8)]
    single = results[2]
    for r in results[:2]:
        assert r["tokens"] == single["tokens"]
        diff = np.abs(np.asarray(r["logits"]) - np.asarray(single["logits"]))
        assert diff.mean() <= 0.03 and diff.max() <= 0.4, (diff.mean(), diff.max())
    assert all(len(t) == 4 or cfg.eos_token in t for t in single["tokens"])


def test_distributed_options_come_from_flags_or_jax_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    opts = resolve_options(environ=env)
    assert (opts.coordinator, opts.num_processes, opts.process_id, opts.enabled) == ("10.0.0.1:1234", 2, 1, True)
    assert resolve_options("h:1", 4, 3, environ=env).process_id == 3  # flags win
    assert not resolve_options(environ={}).enabled
    for args, message in ((("h:1", 2, None), "together"), (("h:1", 2, 2), "0..1"), ((None, 2, 0), "--coordinator"),
                          (("nohostport", 2, 0), "HOST:PORT"), (("h:99999", 2, 0), "HOST:PORT")):
        with pytest.raises(DistributedError, match=message):
            resolve_options(*args, environ={})
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES"):
        resolve_options("h:1", environ={"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})
