#!/usr/bin/env bash
# Call 6: does the host's wait at the sync inflate our rows? The same rows timed one run per
# sync (--batch 1, as the table) and 8 runs per sync (--batch 8), side by side, with PyTorch's
# script in the same call.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && [ -f $b/cubecl-cache.tgz ] && tar xzf $b/cubecl-cache.tgz -C target && echo restored cubecl cache
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
for batch in 1 8; do
  for mode in fwd fwdbwd; do
    timeout 90 $b/moe-gpu-bench --backend cuda --shape small --mode $mode --tokens 4096,8192,16384 --what layer \
      --warmup 3 --reps 10 --batch $batch --out $OUT/batch.jsonl | cut -c1-150 | sed "s/^/batch $batch /"
  done
  timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode fwd --tokens 8192 --what gemm,stages \
    --warmup 2 --reps 5 --batch $batch --out $OUT/batch.jsonl | cut -c1-150 | sed "s/^/batch $batch /"
  timeout 60 $b/moe-gpu-bench --backend cuda --shape dsv3 --mode fwd --tokens 8192 --what layer \
    --warmup 2 --reps 5 --batch $batch --out $OUT/batch.jsonl | cut -c1-150 | sed "s/^/batch $batch /"
done
t torch
timeout 240 python3 $b/torch_moe_bench.py $OUT/torch.json 4096,8192,16384 > $OUT/torch.txt 2>&1
echo "torch exit $?"; grep -E "grouped" $OUT/torch.txt | cut -c1-160
t done
