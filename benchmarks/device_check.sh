#!/usr/bin/env bash
# One command for a machine with a GPU (runs in under 8 minutes, each step under its own limit):
#   1. bf16 parity of grokcli against xAI's reference logits on ../shared/fixtures,
#   2. compile time of prefill + decode at 4/16/64 layers (benchmarks/bench_compile.py),
#   3. a Grok-1-width decode benchmark on as many layers as fit one GPU (benchmarks/bench_decode.py),
# then prints one table. Run from the repository root:   bash benchmarks/device_check.sh
# PYTHON picks the interpreter (default: python3); a step that fails or overruns is a row that
# says so, and the script exits non-zero.
set -u -o pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/grokcli-device-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROWS="$WORK/rows.tsv"
FAILED=0
: >"$ROWS"

row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$ROWS"; }

# run LIMIT_S NAME LOGFILE CMD...: runs a step under a time limit; a failure becomes a table row.
run() {
    local limit=$1 name=$2 log=$3
    shift 3
    echo "== $name (limit ${limit} s)" >&2
    if timeout "$limit" "$@" >"$log" 2>"$log.err"; then
        return 0
    fi
    local rc=$?
    FAILED=1
    if [ "$rc" -eq 124 ]; then
        row "$name" "TIMED OUT" "over ${limit} s"
    else
        row "$name" "FAILED (exit $rc)" "$(tail -n 1 "$log.err" | cut -c1-100)"
    fi
    tail -n 20 "$log.err" >&2
    return 1
}

"$PYTHON" - <<'EOF' >&2 || { echo "device_check: no accelerator visible to jax" >&2; exit 1; }
import jax
print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
raise SystemExit(0 if jax.default_backend() != "cpu" else 1)
EOF

# 1. bf16 parity on the official fixtures (same tolerances as tests/test_model.py).
if run 150 "bf16 parity" "$WORK/parity.tsv" "$PYTHON" - <<'EOF'
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import grokcli

ok = True
for name in ("tiny-a", "tiny-b"):
    path = Path("..") / "shared" / "fixtures" / name
    model, _ = grokcli.load(path, dtype=jnp.bfloat16)
    tokens = np.load(path / "tokens.npy")
    expected = np.load(path / "logits.npy")
    got = model.logits(tokens)
    diff = np.abs(got - expected)
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    passed = diff.mean() <= 0.03 and diff.max() <= 0.4 and agree >= 0.95
    ok &= bool(passed)
    print(f"bf16 parity {name}\t{'ok' if passed else 'MISMATCH'}\t"
          f"mean |d| {diff.mean():.4f}, max |d| {diff.max():.4f}, argmax {agree:.3f}")
raise SystemExit(0 if ok else 1)
EOF
then cat "$WORK/parity.tsv" >>"$ROWS"
else cat "$WORK/parity.tsv" >>"$ROWS" 2>/dev/null; fi

# 2. Compile time against depth (the layers are one scan: acceptance 64-layer <= 1.5x 4-layer).
if run 180 "compile 4/16/64 layers" "$WORK/compile.txt" "$PYTHON" benchmarks/bench_compile.py --layers 4 16 64; then
    while read -r n _ _ _ pre _ _ _ dec _ _ total _; do
        row "compile ${n} layers" "${total} s" "prefill ${pre} s + decode ${dec} s"
    done < <(grep -E '^ *[0-9]+ layers: compile' "$WORK/compile.txt")
    ratio=$(grep -E '^ratio' "$WORK/compile.txt")
    row "compile 64/4 ratio" "$(echo "$ratio" | awk '{print $4}')" "$(echo "$ratio" | sed 's/.*(//; s/)$//')"
    grep -q 'NOT met' "$WORK/compile.txt" && FAILED=1
fi

# 3. Grok-1 width (emb 6144, 48/8 heads of 128, 8 experts, vocab 131072): the most layers whose
#    weights, KV cache and activations fit 70% of one device by grokcli's own memory planner
#    (bench_decode draws its random weights layer by layer, then stacks them: one stack's copy
#    is transient on top of the weights).
LAYERS=$("$PYTHON" - <<'EOF'
import dataclasses

from grokcli.config import GROK_1
from grokcli.memory import device_memory_bytes, plan_memory

memory = device_memory_bytes()
if not memory:
    raise SystemExit("cannot read the device's memory")
fits = [n for n in range(1, GROK_1.num_layers + 1)
        if plan_memory(dataclasses.replace(GROK_1, num_layers=n), (1, 1), batch=8, context=1024,
                       device_memory=int(0.7 * memory)).fits]
print(max(fits) if fits else 0)
EOF
)
if [ -z "$LAYERS" ] || [ "$LAYERS" -lt 1 ]; then
    row "decode Grok-1 width" "SKIPPED" "not one layer fits the device (or its memory is unknown)"
    FAILED=1
elif run 300 "decode Grok-1 width, $LAYERS layers" "$WORK/decode.txt" "$PYTHON" benchmarks/bench_decode.py \
        --emb 6144 --q-heads 48 --kv-heads 8 --key-size 128 --layers "$LAYERS" --vocab 131072 \
        --random-on-device --skip-baseline --batch 1,8 --new-tokens 32 --rounds 1 --context 1024; then
    while read -r _ batch _ decode unit rest; do
        row "decode ${LAYERS} layers, batch ${batch%:}" "${decode} ${unit%,}" "$rest"
    done < <(grep -E '^  batch [0-9]+: decode' "$WORK/decode.txt")
fi

echo
printf '%-36s  %-18s  %s\n' "check" "result" "detail"
printf '%-36s  %-18s  %s\n' "-----" "------" "------"
while IFS=$'\t' read -r name result detail; do
    printf '%-36s  %-18s  %s\n' "$name" "$result" "$detail"
done <"$ROWS"
exit "$FAILED"
