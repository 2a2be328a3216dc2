#!/usr/bin/env bash
# Call 4: training tokens/s of the `small` MoE model on version 23 (f32, `Autodiff<Cuda>`,
# fusion + autotune; run-h200.sh's train phase, 20 steps, no compiled-kernel cache: the first
# step compiles cold).
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > $OUT/env.txt 2>&1
GPU_BIN=$b ARMS=moe STEPS=20 TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-420} bash benches/gpu/run-h200.sh train $OUT 2>&1 \
  | grep -vE "^\s*$" | tail -8
python3 - "$OUT/train-moe.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "tokens_per_s" in r and r.get("step", 0) >= 3]
print("steps", len(rows), "median tokens/s of steps 3+:", statistics.median(r["tokens_per_s"] for r in steps) if steps else None)
for r in rows[:2] + rows[-1:]:
    print({k: r.get(k) for k in ("step", "loss", "tokens_per_s", "elapsed_s")})
PY
