"""Two processes on 127.0.0.1 joined by jax.distributed (gloo CPU collectives), 4 simulated devices
each, run the same `grok complete` command on a 1x8 mesh spanning both, and print the greedy
tokens that one process with 8 devices prints; only process 0 writes anything. Every process is
killed when the test ends, whatever happens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grokcli.distributed import DistributedError, resolve_options

TESTS = Path(__file__).resolve().parent
TOKENIZER = TESTS.parents[1] / "shared" / "grok1" / "tokenizer.model"
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "GROK_MESH") and not k.startswith("JAX_COORDINATOR")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # halves compile time; sharding is still partitioned by XLA
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    return env


def _run_all(commands: list[list[str]], envs: list[dict], tmp_path: Path) -> tuple[list, list[str], list[str]]:
    """Start every command, wait up to TIMEOUT_S (less if one fails), kill what is left."""
    outs = [open(tmp_path / f"out{i}.txt", "w+") for i in range(len(commands))]
    errs = [open(tmp_path / f"err{i}.txt", "w+") for i in range(len(commands))]
    procs = []
    try:
        for cmd, env, out, err in zip(commands, envs, outs, errs):
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True))
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
    texts = []
    for files in (outs, errs):
        texts.append([])
        for f in files:
            f.seek(0)
            texts[-1].append(f.read())
            f.close()
    return codes, texts[0], texts[1]


def test_two_processes_generate_what_one_process_generates(tmp_path, tiny_config, tiny_checkpoint):
    if not TOKENIZER.is_file():
        pytest.skip(f"the Grok-1 tokenizer is not at {TOKENIZER} (shared data next to the repository)")
    cfg = tiny_config(vocab_size=131072, num_layers=2, num_q_heads=8, num_kv_heads=4)
    ckpt = tiny_checkpoint(cfg, seed=3, tokenizer_path=TOKENIZER)
    grok = [sys.executable, "-m", "grokcli.cli", "complete", "-c", str(ckpt), "--temp", "0", "-n", "4",
            "--json", "--no-compile-cache", "-p", "The answer is", "-p", "Once upon"]
    coordinator = f"127.0.0.1:{_free_port()}"
    commands = [grok + ["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)] for i in range(2)]
    commands.append(grok)  # one process, 8 devices: the default mesh is 1x8 too
    codes, stdout, stderr = _run_all(commands, [_env(4), _env(4), _env(8)], tmp_path)
    logs = "\n".join(f"--- process {i} stderr:\n" + "".join(
        line for line in err.splitlines(True) if "[Gloo]" not in line)[-3000:] for i, err in enumerate(stderr))
    assert codes == [0, 0, 0], f"exit codes {codes} (None: killed at the {TIMEOUT_S} s limit)\n{logs}"

    assert stdout[1] == "" and stderr[1] == "", "process 1 wrote to the terminal"
    rows = [[json.loads(line) for line in text.splitlines()] for text in (stdout[0], stdout[2])]
    assert [len(r) for r in rows] == [2, 2], stdout
    two_hosts, one_host = ([r["token_ids"] for r in rs] for rs in rows)
    assert two_hosts == one_host
    assert all(len(t) == 4 or r["finish_reason"] == "eos" for t, r in zip(one_host, rows[1]))
    assert "compil" in stderr[0]  # process 0 keeps its progress on stderr


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


def test_unreachable_coordinator_is_one_line_not_an_abort():
    """A worker whose coordinator never answers: progress while waiting, then one line, exit 1."""
    from conftest import grok_command

    command, env = grok_command()
    t0 = time.monotonic()
    proc = subprocess.run(command + ["complete", "--model", "demo", "--coordinator", "127.0.0.1:1",
                                     "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "6",
                                     "hi"], capture_output=True, text=True, timeout=120, env=env)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot reach the coordinator 127.0.0.1:1"), proc.stderr
    assert any("waiting for the coordinator 127.0.0.1:1" in line for line in lines[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr and "@" not in proc.stderr
