"""One process of the multi-host test (run by tests/test_multihost.py, not collected by pytest).

usage: multihost_worker.py CHECKPOINT MESH OUT_JSON [COORDINATOR NUM_PROCESSES PROCESS_ID]

Simulates DEVICES CPU devices (env GROK_TEST_DEVICES, default 4), joins the distributed runtime
when a coordinator is given, loads the checkpoint on the mesh, and writes the greedy tokens and
the logits of a fixed batch to OUT_JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={os.environ.get('GROK_TEST_DEVICES', '4')}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str]) -> None:
    checkpoint, mesh, out_path = argv[:3]
    from grokcli import distributed

    if len(argv) > 3:
        coordinator, num_processes, process_id = argv[3], int(argv[4]), int(argv[5])
        distributed.initialize(coordinator, num_processes, process_id, timeout_s=60)
    import jax
    import numpy as np

    import grokcli

    model, _ = grokcli.load(checkpoint, mesh=mesh)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = grokcli.generate_batch(model, None, prompts, temperature=0, max_tokens=4)
    tokens = np.array([[3, 5, 7, 11, 13], [17, 19, 23, 29, 31]], np.int32)
    logits = model.logits(tokens)
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "tokens": [list(c.token_ids) for c in completions],
        "logits": logits.round(5).tolist(),
    }
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
