#!/usr/bin/env bash
# pefref's benchmarks on one CUDA GPU, in one go (about 3-4 minutes on an H100/H200).
#
# Run from the repository root:
#     OUT=/some/dir bash benchmarks/gpu_bench.sh
# Environment:
#     OUT     where the results go (required): techniques.{json,md}, inject.{json,md}, decode.{json,md}, env.txt, *.log
#     PYTHON  the interpreter (default python3); it needs torch with CUDA, transformers, peft and pefref's
#             dependencies (pydantic, pyyaml, networkx, jinja2, typer, rich, safetensors)
#     WHEELS  optional folder of wheels (pinned transformers, peft, pydantic, ...) installed first, without
#             dependencies or an index, into a private folder put in front of PYTHONPATH
#     QUICK_TIMEOUT, INJECT_TIMEOUT, DECODE_TIMEOUT  seconds allowed to each step (defaults 200, 60, 60)
# Every step runs under its own timeout and a failing step does not stop the next one; the exit status
# is the number of steps that failed.
set -u
: "${OUT:?set OUT to the folder for the results}"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

if [ -n "${WHEELS:-}" ]; then
    SITE=$(mktemp -d /tmp/pefref-site.XXXXXX)
    "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1 || echo "wheel install failed (see wheels.log)"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print('transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1
    echo "load average: $(cat /proc/loadavg)"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

failed=0
step() {  # name timeout command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local t0=$SECONDS
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "   done in $((SECONDS - t0))s"
    else
        echo "   FAILED or timed out (status $?) after $((SECONDS - t0))s; tail of $name.log:"
        tail -n 15 "$OUT/$name.log"
        failed=$((failed + 1))
    fi
}

# a training step of every technique peft implements, bf16 on the GPU (a model big enough for the GPU
# to matter, still small enough for every technique to finish in time); LoRA also compiled
step techniques "${QUICK_TIMEOUT:-200}" "$PY" benchmarks/bench_techniques.py --quick --device cuda --dtype bf16 \
    --hidden 1024 --intermediate 2816 --layers 4 --heads 16 --kv-heads 8 --vocab 32000 --batch 4 --seq 256 \
    --rounds 5 --reps 3 --warmup 3 --mem-reps 1 --compile lora \
    --json "$OUT/techniques.json" --markdown "$OUT/techniques.md"

# injection into the 70B-shaped model on the meta device (CPU work: the GPU plays no part)
step inject "${INJECT_TIMEOUT:-60}" "$PY" benchmarks/bench_inject.py --rounds 7 --cold-rounds 0 --json "$OUT/inject.json"
sed -n '/^| mode/,$p' "$OUT/inject.log" | grep '^|' > "$OUT/inject.md" 2>/dev/null || true

# one-token decoding after merge(), against the base model, bf16 on the GPU
step decode "${DECODE_TIMEOUT:-60}" "$PY" benchmarks/bench_decode.py --device cuda --dtype bf16 \
    --hidden 2048 --intermediate 5632 --layers 8 --heads 16 --kv-heads 8 --vocab 32000 --prompt 256 \
    --rounds 15 --reps 20 --json "$OUT/decode.json" --markdown "$OUT/decode.md"

for f in techniques.md inject.md decode.md; do
    [ -s "$OUT/$f" ] && { echo; echo "### $f"; cat "$OUT/$f"; }
done
echo
echo "$failed step(s) failed; results in $OUT"
exit "$failed"
