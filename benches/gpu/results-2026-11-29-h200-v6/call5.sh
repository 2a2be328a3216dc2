#!/usr/bin/env bash
# Call 5: the dsv3 fwd+bwd rows call 4 had no time for (T 4096 and 16384), then the CUDA
# `layouts` test on the final build.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && [ -f $b/cubecl-cache.tgz ] && tar xzf $b/cubecl-cache.tgz -C target && echo restored cubecl cache
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
t dsv3 fwdbwd
timeout 200 $b/moe-gpu-bench --backend cuda --shape dsv3 --mode fwdbwd --tokens 4096,16384 --what layer \
   --warmup 3 --reps 10 --out $OUT/dsv3-fwdbwd.jsonl | cut -c1-170
t layouts
RUST_BACKTRACE=1 timeout 280 $b/layouts --nocapture on_cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"
grep -E "^test |panicked|test result" $OUT/layouts-cuda.txt | head
t done
