#!/usr/bin/env bash
# Call 3: uploaded tile tables kept and reused: the GEMM's launch overhead (isolated GEMM rows,
# which reuse one table every repetition), stage and layer rows.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && [ -f $b/cubecl-cache.tgz ] && tar xzf $b/cubecl-cache.tgz -C target && echo restored cubecl cache
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
for shape in small dsv3; do
  timeout 80 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what gemm,layer,stages \
     --warmup 2 --reps 9 --out $OUT/rows.jsonl | cut -c1-170
done
timeout 80 $b/moe-gpu-bench --backend cuda --shape small --mode fwd --tokens 4096,16384 --what layer \
     --warmup 2 --reps 9 --out $OUT/rows.jsonl | cut -c1-170
timeout 80 $b/moe-gpu-bench --backend cuda --shape small --mode fwdbwd --tokens 4096,8192,16384 --what layer \
     --warmup 2 --reps 9 --out $OUT/rows.jsonl | cut -c1-170
t done
tar czf $OUT/cubecl-cache.tgz --exclude=./release --exclude=./debug -C target . && ls -la $OUT/cubecl-cache.tgz
