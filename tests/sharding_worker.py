"""The 8-simulated-device half of tests/test_sharding.py (run in its own process; not collected).

usage: sharding_worker.py WORKDIR OUT_JSON

XLA_FLAGS must force 8 host devices before jax is imported, which is why this runs apart from
the rest of the suite. For each test config it writes a random release-format checkpoint, loads
it on every mesh, and records logits, greedy tokens and how the parameters were laid out; the
assertions live in test_sharding.py.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharding_configs import CONFIGS, LOGITS_ONLY_MESHES, MESHES, PROMPTS, TOKENS, scaled_params  # noqa: E402


def layout(model) -> dict:
    """Bytes per device and, for each leaf, the fraction of it the fullest device holds."""
    import jax

    from grokcli.params import get_leaf, param_specs
    from grokcli.quant import QuantizedWeight

    per_device: dict[str, int] = {}
    total = 0
    fractions = {}
    scales_shards = {}
    for spec in param_specs(model.config):
        leaf = get_leaf(model.params, spec)
        arrays = {"weight": leaf.weight, "scales": leaf.scales} if isinstance(leaf, QuantizedWeight) else {"plain": leaf}
        for part, arr in arrays.items():
            total += arr.nbytes
            biggest = 0
            for shard in arr.addressable_shards:
                key = str(shard.device.id)
                per_device[key] = per_device.get(key, 0) + shard.data.nbytes
                biggest = max(biggest, shard.data.nbytes)
            fractions[f"{spec.path}:{part}"] = biggest / arr.nbytes
            if part == "scales" and spec.row_blocks > 1 and spec.layer == 0:
                scales_shards[spec.name] = sorted({tuple(s.data.shape) for s in arr.addressable_shards})
    return {"per_device": per_device, "total": total, "fractions": fractions,
            "scales_shards": {k: [list(s) for s in v] for k, v in scales_shards.items()},
            "devices_used": len(per_device), "jax_devices": jax.device_count()}


def main(workdir: str, out_path: str) -> None:
    import numpy as np

    import grokcli
    from grokcli.checkpoint import write_checkpoint
    from grokcli.memory import plan_memory
    from grokcli.sharding import mesh_shape_dict

    results = {}
    for name, cfg in CONFIGS.items():
        params = scaled_params(cfg)
        ckpt = write_checkpoint(Path(workdir) / name, params, cfg)
        for mesh in MESHES[name] + LOGITS_ONLY_MESHES.get(name, []):
            model, _ = grokcli.load(ckpt, mesh=None if mesh == "none" else mesh)
            entry = {"logits": model.logits(np.array(TOKENS, np.int32)).tolist()}
            if mesh in MESHES[name]:
                done = grokcli.generate_batch(model, None, PROMPTS, temperature=0, max_tokens=4)
                entry["tokens"] = [list(c.token_ids) for c in done]
            if mesh != "none":
                entry["layout"] = layout(model)
                shape = mesh_shape_dict(model.mesh)
                plan = plan_memory(cfg, (shape["data"], shape["model"]), batch=1, context=cfg.sequence_len,
                                   dtype="float32")
                entry["planned_weights_per_device"] = plan.weights_per_device
            results[f"{name}/{mesh}"] = entry
            print(f"{name} {mesh} done", file=sys.stderr, flush=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
