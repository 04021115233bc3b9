#!/usr/bin/env bash
# Issue 26's GPU evidence in one time-boxed run on the device machine, in the issue's order of value, each step
# capped so that the next one still starts; results (at most 8 files) go to $OUT.
#
#   here, once:      bash bench/gpu/wheels.sh            (open_clip and what else the device image lacks, into .whl/)
#   on the device:   run(command="bash bench/gpu/evidence.sh", carry=[".whl"], timeout_s=600)
#   a dry run here:  PYTHON=.venv/bin/python DEVICE=cpu SCALE=0.0002 ITERATIONS=1 MEMORY_PRESET=clip-vit-b-32 \
#                    MEMORY_TASKS=1 BASE_PRESET=smoke BUDGET=1800 CAP_SCALE=4 OUT=/tmp/evidence bash bench/gpu/evidence.sh
#                    (561 s on 2 cores of AMD EPYC, each ViT-B/32 bench step about 190 s; 342 s on the Intel Xeon, 112-124 s)
#
# 1. bench: the official-style loop against the library's on ViT-B/32 (random weights, SCALE x the paper's test
#    sets, ITERATIONS official iterations), Surgery and SurgeryV2, shared and per-task Adam, fp32 then bf16.
# 2. SurgeryV2's peak memory on ViT-L/14 (rank 4, batch 16 per task) for 1 and 8 tasks (bench/gpu/v2_memory.py).
# 3. the base preset: its zoo, then its table with Surgery and SurgeryV2. The zoo resumes where a killed build
#    stopped, inside the model it was training (from that loop's checkpoint, at most a minute old; its cache is
#    .cache-gpu/ in the checkout), so a second call on the same warm machine continues it.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu-evidence}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-420}  # seconds for the whole run: a 600 s call then ends with time to spare
SCALE=${SCALE:-0.1}
ITERATIONS=${ITERATIONS:-50}
MEMORY_PRESET=${MEMORY_PRESET:-clip-vit-l-14}
MEMORY_TASKS=${MEMORY_TASKS:-1,8}
BASE_PRESET=${BASE_PRESET:-base}
CAP_SCALE=${CAP_SCALE:-1}  # multiplies every step's cap: a dry run on a CPU that should finish the steps gives 4
mkdir -p "$OUT"
started=$SECONDS
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SURGERY_BOOK_CACHE=$PWD/.cache-gpu
python=${PYTHON:-python3}
log=$OUT/log.txt
{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    lscpu | grep -m1 "Model name"
    $python -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
} > "$OUT/machine.txt" 2>&1

# step NAME CAP COMMAND...: runs COMMAND with at most CAP seconds (and never past the budget), stdout to NAME.
step() {
    local name=$1 cap=$(($2 * CAP_SCALE)) left
    shift 2
    left=$((BUDGET - (SECONDS - started)))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, $left s of the budget left" | tee -a "$log"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (at most $cap s): $*" | tee -a "$log"
    local begun=$SECONDS
    timeout "$cap" "$@" > "$OUT/$name" 2>> "$log"
    echo "== $name: exit $? after $((SECONDS - begun)) s" | tee -a "$log"
}

bench=(-m surgery_lib bench --vit-b32 --device "$DEVICE" --scale "$SCALE" --iterations "$ITERATIONS"
    --adam shared,per-task --json --quiet)
step bench-vit-b32-fp32.json 150 $python "${bench[@]}" --precision fp32
step bench-vit-b32-bf16.json 120 $python "${bench[@]}" --precision bf16
step v2-memory.jsonl 120 $python bench/gpu/v2_memory.py --preset "$MEMORY_PRESET" --device "$DEVICE" \
    --tasks "$MEMORY_TASKS"
step base-zoo.txt 100000 $python -m surgery_lib zoo --preset "$BASE_PRESET" --device "$DEVICE" --quiet
step base-table.json 100000 $python -m surgery_lib table --preset "$BASE_PRESET" --device "$DEVICE" \
    --surgery none,1,2 --seeds 1 --json --quiet
manifest=$(ls -d .cache-gpu/zoo/"$BASE_PRESET"-*/manifest.json 2>/dev/null | head -1)
[ -n "$manifest" ] && cp "$manifest" "$OUT/base-manifest.json"
echo "== done in $((SECONDS - started)) s" | tee -a "$log"
for f in "$OUT"/*; do echo "--- $(basename "$f")"; head -c 3000 "$f"; echo; done
