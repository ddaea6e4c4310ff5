"""The memory planner on the full Grok-1 config (shapes only), and the CLI's checks before loading."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from grokcli import cli
from grokcli.config import GROK_1
from grokcli.memory import MemoryPlanError, check_fits, plan_memory

GB = 10**9


def test_grok1_fits_8x80gb_in_int8():
    plan = plan_memory(GROK_1, (1, 8), batch=1, context=8192, device_memory=80 * GB)
    assert plan.fits is True
    assert 38 * GB < plan.weights_per_device < 41 * GB  # ~316 GB of int8 weights and scales / 8
    assert plan.per_device_bytes < 0.95 * 80 * GB


def test_grok1_does_not_fit_8x24gb():
    plan = plan_memory(GROK_1, "1x8", batch=1, context=8192, device_memory=24 * GB)
    assert plan.fits is False
    with pytest.raises(MemoryPlanError) as e:
        check_fits(plan)
    message = str(e.value)
    assert "not enough device memory" in message and "mesh 1x8" in message
    assert "weights 39." in message and "per device" in message and "24.0 GB" in message


def test_grok1_fits_16x40gb_across_two_hosts_model_parallel():
    plan = plan_memory(GROK_1, (1, 16), batch=1, context=8192, device_memory=40 * GB)
    assert plan.fits is True
    assert plan.weights_per_device < 21 * GB
    # The same 16 GPUs as 2x8 copy the weights along the data axis: no longer fits, and says why.
    data_parallel = plan_memory(GROK_1, (2, 8), batch=2, context=8192, device_memory=40 * GB)
    assert data_parallel.fits is False
    assert "--mesh 1x16" in data_parallel.advice()


def test_weight_and_cache_bytes_from_first_principles():
    plan = plan_memory(GROK_1, (1, 8), batch=4, context=4096, dtype="bfloat16")
    experts = 64 * 3 * 8 * 6144 * 32768  # int8, one byte each
    attention = 64 * (2 * 6144 * 48 * 128 + 2 * 6144 * 8 * 128)
    embed = 131072 * 6144 * 2  # bf16 on accelerators
    assert experts + attention + embed < plan.weights_bytes < (experts + attention + embed) * 1.01  # + scales, norms
    assert plan.weights_per_device == pytest.approx(plan.weights_bytes / 8, rel=0.01)
    kv = 2 * 64 * 4 * 4096 * 8 * 128 * 2  # k and v, bf16: 8 kv heads split over 8 devices
    assert plan.kv_cache_per_device == pytest.approx(kv / 8 + 4 * 4096 // 8 + 16, abs=4 * 4096 + 16)
    assert plan.fits is None  # no device memory given: unknown, never a refusal
    # Batch rows split over the data axis: the per-device cache halves on 2x8 with the same batch.
    assert plan_memory(GROK_1, (2, 8), batch=4, context=4096).kv_cache_per_device < 0.6 * plan_memory(
        GROK_1, (1, 8), batch=4, context=4096).kv_cache_per_device


def test_more_batch_and_context_need_more_memory():
    small = plan_memory(GROK_1, (1, 8), batch=1, context=1024)
    big = plan_memory(GROK_1, (1, 8), batch=8, context=8192)
    assert big.kv_cache_per_device == pytest.approx(64 * small.kv_cache_per_device, rel=0.01)
    assert big.activations_per_device > small.activations_per_device
    assert big.weights_per_device == small.weights_per_device


# --- the CLI ----------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=False)


@pytest.fixture
def grok1_dir(tmp_path):
    """A directory that `grok info` resolves to Grok-1 (no config.json means the Grok-1 preset)."""
    (tmp_path / "grok-1" / "ckpt-0").mkdir(parents=True)
    return tmp_path / "grok-1"


@pytest.mark.parametrize("mesh, memory, fits", [("1x8", "80GB", True), ("1x8", "24GB", False), ("1x16", "40GB", True)])
def test_info_memory_json(grok1_dir, mesh, memory, fits):
    r = run("info", "-c", str(grok1_dir), "--no-devices", "--mesh", mesh, "--device-memory", memory,
            "--batch", "1", "--context", "8192", "--json")
    assert r.exit_code == 0, r.stderr
    mem = json.loads(r.stdout)["memory"]
    assert mem["fits"] is fits and mem["mesh"] == mesh
    assert mem["per_device_bytes"] == (mem["weights_per_device_bytes"] + mem["kv_cache_per_device_bytes"]
                                       + mem["activations_per_device_bytes"])


def test_info_memory_table(grok1_dir):
    r = run("info", "-c", str(grok1_dir), "--no-devices", "--mesh", "1x8", "--device-memory", "24GB", "--memory")
    assert r.exit_code == 0, r.stderr
    assert "does not fit" in r.stdout and "per device" in r.stdout and "KV cache" in r.stdout


@pytest.fixture
def tiny_with_tokenizer(tiny_config, tiny_checkpoint):
    path = tiny_checkpoint(tiny_config())
    (path / "tokenizer.model").write_bytes(b"not read: the checks come first")
    return path


def test_complete_refuses_before_loading_when_it_cannot_fit(tiny_with_tokenizer):
    r = run("complete", "-c", str(tiny_with_tokenizer), "--device-memory", "1MB", "-n", "4", "hello")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not enough device memory" in lines[0], r.stderr
    assert "per device on mesh 1x1" in lines[0] and "usable" in lines[0]
    assert r.stdout == ""


def test_complete_rejects_a_mesh_the_devices_cannot_form(tiny_with_tokenizer):
    r = run("complete", "-c", str(tiny_with_tokenizer), "--mesh", "2x4", "hello")
    assert r.exit_code == 2
    assert "--mesh" in r.stderr and "needs 8 devices" in r.stderr and "1x1" in r.stderr
    assert r.stdout == ""


def test_repl_refuses_to_run_across_hosts(tiny_with_tokenizer):
    r = run("repl", "-c", str(tiny_with_tokenizer), "--coordinator", "127.0.0.1:1", "--num-processes", "2",
            "--process-id", "0")
    assert r.exit_code == 2 and "grok repl runs on one host" in r.stderr


def test_load_refuses_before_reading_any_tensor(tiny_config, tiny_checkpoint, monkeypatch):
    """The library's own load runs the fit check: a forced small device memory stops it first."""
    import grokcli
    from grokcli import checkpoint
    from grokcli.memory import Reservation

    path = tiny_checkpoint(tiny_config())
    opened = []
    monkeypatch.setattr(checkpoint, "iter_leaves", lambda *a, **k: opened.append(a) or iter(()))
    monkeypatch.setattr(checkpoint, "check_checkpoint_shapes", lambda *a, **k: opened.append(a))
    with pytest.raises(MemoryPlanError, match="not enough device memory"):
        grokcli.load(path, device_memory=1_000_000, reserve_for=Reservation(batch=4, max_tokens=64))
    assert opened == []
    monkeypatch.undo()
    model, _ = grokcli.load(path, device_memory=10**12)  # the same checkpoint fits a large device
    assert model.config.num_layers == tiny_config().num_layers


def test_info_plans_grok1_from_shapes_before_any_download():
    r = run("info", "--model", "grok-1", "--no-devices", "--mesh", "1x8", "--device-memory", "80GB",
            "--memory", "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["from_shapes"] and info["checkpoint"] is None and "from shapes" in info["source"]
    assert info["config"]["num_layers"] == 64 and info["memory"]["fits"] is True


def test_per_device_and_total_add_up_on_a_mesh_that_does_not_divide():
    plan = plan_memory(GROK_1, (3, 3), batch=3, context=1024, device_memory=80 * GB).to_json()
    assert plan["total_bytes"] == plan["per_device_bytes"] * 9
    assert plan["per_device_bytes"] == (plan["weights_per_device_bytes"] + plan["kv_cache_per_device_bytes"]
                                        + plan["activations_per_device_bytes"])
