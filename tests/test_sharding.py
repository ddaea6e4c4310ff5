"""Sharding: the partition rules, mesh checks, and the sharded model on 8 simulated CPU devices.

The 8-device checks run in one subprocess (tests/sharding_worker.py): XLA_FLAGS must force the
device count before jax is imported, and the rest of the suite keeps its single device. Logits
are compared with an independent numpy forward (tests/numpy_reference.py) and across meshes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from grokcli.config import GROK_1
from grokcli.params import param_specs
from grokcli.sharding import (MeshError, check_mesh_shape, mesh_suggestions, param_partitions, parse_mesh_shape,
                              partition)

from numpy_reference import forward_row
from sharding_configs import CONFIGS, LOGITS_ONLY_MESHES, MESHES, TOKENS, scaled_params

TESTS = Path(__file__).resolve().parent
WORKER_TIMEOUT_S = 420


# --- the rules, from shapes alone -------------------------------------------------------------


def test_grok1_on_8_devices_splits_every_big_matrix_along_its_natural_axis():
    parts = param_partitions(GROK_1, {"data": 1, "model": 8})
    want = {"w_gate": "ffn", "w_up": "ffn", "w_down": "ffn", "q": "q_heads", "o": "q_heads", "k": "kv_heads",
            "v": "kv_heads", "embed": "vocab"}
    for spec in param_specs(GROK_1)[:40]:
        part = parts[(spec.name, spec.layer)]["weight" if spec.quantized else "plain"]
        if spec.name in want:
            assert part[spec.axes.index(want[spec.name])] == "model", (spec.path, part)
            assert part.count("model") == 1
        else:  # norms and the router are small: replicated
            assert part == (None,) * len(spec.shape), (spec.path, part)


@pytest.mark.parametrize("model_axis, blocks_split", [(1, False), (2, True), (4, True), (8, True),
                                                      (3, False), (6, False), (16, False)])
def test_row_blocked_scales_follow_the_rows_only_when_the_blocks_divide(model_axis, blocks_split):
    parts = param_partitions(GROK_1, {"data": 1, "model": model_axis})
    for name in ("w_down", "o"):
        spec = next(s for s in param_specs(GROK_1) if s.name == name)
        weight, scales = parts[(name, spec.layer)]["weight"], parts[(name, spec.layer)]["scales"]
        assert scales[-2] == ("model" if blocks_split else None), (name, model_axis, scales)
        assert scales[-1] == weight[-1] and scales[:-2] == weight[:-2]


def test_dimensions_that_do_not_divide_fall_back_or_replicate():
    six = param_partitions(GROK_1, {"data": 1, "model": 6})
    # 8 kv heads do not split 6 ways: the key/value projections split their 6144 input rows instead.
    assert six[("k", 0)]["weight"] == ("model", None)
    # ffn 32768 does not divide by 6 either: the experts split along emb.
    assert six[("w_gate", 0)]["weight"] == (None, "model", None)
    assert six[("q", 0)]["weight"] == (None, "model")  # 48 heads / 6
    # Nothing of a 5-wide vector divides 4: replicated, not an error.
    assert partition(("vocab",), (5,), {"model": 4}) == (None,)
    # A dimension splits at head boundaries only: 6 heads x 4 = 24 columns are not split 4 ways.
    cfg = CONFIGS["odd"]
    assert partition(("emb", "q_heads"), (cfg.emb_size, 24), {"model": 4}, cfg) == ("model", None)


def test_two_dimensions_never_land_on_one_mesh_axis():
    with pytest.raises(ValueError, match="repeat"):
        partition(("ffn", "ffn"), (8, 8), {"model": 2})
    for spec in param_specs(GROK_1)[:20]:
        for m in (2, 3, 8, 16):
            part = partition(spec.axes, spec.shape, {"data": 2, "model": m}, GROK_1)
            assert part.count("model") <= 1 and "data" not in part


def _devices(n, processes=1):
    return [SimpleNamespace(platform="gpu", process_index=i * processes // n, id=i) for i in range(n)]


def test_mesh_errors_say_what_was_found_and_what_would_work():
    with pytest.raises(MeshError) as e:
        check_mesh_shape((1, 8), _devices(6))
    assert "needs 8 devices but 6 gpu devices are visible" in str(e.value)
    assert "1x6, 2x3, 3x2, 6x1" in str(e.value)
    with pytest.raises(MeshError, match="across 2 processes"):
        check_mesh_shape((1, 8), _devices(16, processes=2))  # several hosts must use every device
    check_mesh_shape((1, 4), _devices(8))  # one process may use the first 4 of 8
    check_mesh_shape((2, 8), _devices(16, processes=2))
    assert mesh_suggestions(4) == ["1x4", "2x2", "4x1"]
    for bad in ("8", "0x8", "axb", "1x2x3", ""):
        with pytest.raises(MeshError, match="DATAxMODEL|>= 1"):
            parse_mesh_shape(bad)
    assert parse_mesh_shape(" 2X4 ") == (2, 4)


def test_default_mesh_is_model_parallel_over_every_device():
    import jax

    from grokcli.sharding import make_mesh, mesh_shape_dict

    mesh = make_mesh()
    assert mesh_shape_dict(mesh) == {"data": 1, "model": jax.device_count()}
    assert mesh.axis_names == ("data", "model")


def test_load_checks_the_mesh_before_reading_any_file(tmp_path):
    import grokcli

    with pytest.raises(MeshError, match="needs 4 devices but 1 cpu device is visible; use one of: 1x1"):
        grokcli.load(tmp_path / "does-not-exist", mesh="1x4")


# --- 8 simulated devices (one subprocess for all meshes) ---------------------------------------


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Results of tests/sharding_worker.py: per 'config/mesh', logits, greedy tokens, layout."""
    work = tmp_path_factory.mktemp("sharded")
    out = work / "results.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # halves compile time; sharding is still partitioned by XLA
    proc = subprocess.Popen([sys.executable, str(TESTS / "sharding_worker.py"), str(work), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        log, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"sharding worker took over {WORKER_TIMEOUT_S} s:\n{log[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-5000:]
    return json.loads(out.read_text())


def _close(got, want) -> tuple[bool, str]:
    """The parity tolerance of the official fixtures: mean |d| <= 0.03, max |d| <= 0.4."""
    diff = np.abs(np.asarray(got) - np.asarray(want))
    return diff.mean() <= 0.03 and diff.max() <= 0.4, f"mean |d| {diff.mean():.4g}, max |d| {diff.max():.4g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_tokens_agree_on_every_mesh(sharded_runs, name):
    base = sharded_runs[f"{name}/none"]
    for mesh in MESHES[name][1:]:
        run = sharded_runs[f"{name}/{mesh}"]
        ok, how = _close(run["logits"], base["logits"])
        assert ok, f"{name} on {mesh}: {how}"
        assert run["tokens"] == base["tokens"], f"{name} on {mesh}: greedy tokens differ"
        assert run["layout"]["devices_used"] == math.prod(int(x) for x in mesh.split("x"))
    assert all(len(t) == 4 or 2 in t for t in base["tokens"])  # four greedy tokens unless EOS came first


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_logits_match_the_numpy_oracle(sharded_runs, name):
    """Including model-axis sizes 3 and 6, where the 8 row blocks of scales cannot follow the rows."""
    cfg = CONFIGS[name]
    params = scaled_params(cfg)
    want = np.stack([forward_row(params, np.array(row), cfg) for row in TOKENS])
    for mesh in MESHES[name] + LOGITS_ONLY_MESHES.get(name, []):
        got = np.asarray(sharded_runs[f"{name}/{mesh}"]["logits"])
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(), err_msg=f"{name} {mesh}")


def test_release_row_blocked_scales_are_sharded_with_their_rows(sharded_runs):
    """8 blocks over 1, 2, 4, 8 model shards: each device holds the 8/m blocks of its own rows."""
    cfg = CONFIGS["divides"]
    for mesh, m in (("1x2", 2), ("1x4", 4), ("1x8", 8), ("2x4", 4)):
        shards = sharded_runs[f"divides/{mesh}"]["layout"]["scales_shards"]
        assert shards["w_down"] == [[cfg.num_experts, 8 // m, cfg.emb_size]], (mesh, shards)
        assert shards["o"] == [[8 // m, cfg.emb_size]], (mesh, shards)
    for mesh in ("1x3", "1x6"):  # blocks do not divide: the scales stay whole (they are small)
        shards = sharded_runs[f"odd/{mesh}"]["layout"]["scales_shards"]
        assert shards["w_down"] == [[CONFIGS["odd"].num_experts, 8, CONFIGS["odd"].emb_size]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_device_holds_its_share_of_the_parameters(sharded_runs, name):
    cfg = CONFIGS[name]
    for mesh in MESHES[name][1:] + LOGITS_ONLY_MESHES.get(name, []):
        data, model = (int(x) for x in mesh.split("x"))
        run = sharded_runs[f"{name}/{mesh}"]
        layout = run["layout"]
        per_device = list(layout["per_device"].values())
        # The planner predicts every device's bytes exactly, from shapes alone.
        assert max(per_device) == run["planned_weights_per_device"], mesh
        # Every leaf the rules split is held 1/model per device: never a full copy.
        parts = param_partitions(cfg, {"data": data, "model": model})
        for spec in param_specs(cfg):
            for part, axes in parts[(spec.name, spec.layer)].items():
                fraction = layout["fractions"][f"{spec.path}:{part}"]
                assert fraction == pytest.approx(1 / model if "model" in axes else 1.0), (mesh, spec.path, part)
        if name == "divides":  # only the small norms and router are replicated
            assert max(per_device) <= 1.2 * layout["total"] / model, (mesh, max(per_device), layout["total"])
            assert min(per_device) == max(per_device)
