"""An 8192-token prompt through a 64-layer tiny-width model, prefilled in chunks: does the
process's memory grow by no more than the memory planner's KV cache + activations for that shape?

    python benchmarks/bench_long_prompt.py

Prints the planned and measured bytes and their ratio (acceptance: measured <= planned). The
measured figure is the peak RSS growth during generation (CPU: no device statistics), so it also
counts compiled code and runtime buffers the planner does not model.
"""
# A benchmark, not a test: on a shared 2-core machine it took minutes of wall time.

import os
import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np

import grokcli
from grokcli.checkpoint import random_params
from grokcli.config import ModelConfig
from grokcli.loader import Model
from grokcli.memory import plan_memory
from grokcli.quant import QuantizedWeight
from grokcli.request_shape import request_shape

cfg = ModelConfig(vocab_size=256, pad_token=0, eos_token=2, sequence_len=8192 + 512, embedding_multiplier_scale=8.0,
                  output_multiplier_scale=0.5773502691896257, emb_size=32, key_size=8, num_q_heads=4,
                  num_kv_heads=2, num_layers=64, widening_factor=2, attn_output_multiplier=0.25,
                  num_experts=4, num_selected_experts=2)
def dev(x):
    if isinstance(x, QuantizedWeight):
        return QuantizedWeight(jnp.asarray(x.weight), jnp.asarray(np.asarray(x.scales, np.float32)))
    return jnp.asarray(x)
params = jax.tree.map(dev, random_params(cfg, seed=0), is_leaf=lambda x: isinstance(x, QuantizedWeight))
model = Model(config=cfg, params=params, dtype=jnp.float32)
prompt = [3 + (i * 7) % 250 for i in range(8192)]
shape = request_shape(cfg, prompt_tokens=len(prompt), max_tokens=4)
plan = plan_memory(cfg, batch=1, context=shape.context, prefill_chunk=shape.prefill_chunk, dtype="float32")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
done = grokcli.generate(model, None, prompt, temperature=0, max_tokens=4)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
growth, planned = peak - before, plan.kv_cache_per_device + plan.activations_per_device
print(f"cpu {jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
print(f"{len(prompt)}-token prompt, {cfg.num_layers} layers, chunk {shape.prefill_chunk}, context {shape.context}: "
      f"{len(done.token_ids)} tokens generated; peak RSS growth {growth / 1e6:.1f} MB, planned {planned / 1e6:.1f} MB "
      f"(KV cache + activations), ratio {growth / planned:.2f} ({'within' if growth <= planned else 'OVER'} the plan)")
