#!/usr/bin/env bash
# Call 1: the plan kernels (scan + place) on the H200: kernel tests, stage rows with host
# (enqueue) times, per-kernel device times of the small layer under ncu, a tile sweep of the
# grouped GEMM, then the CUDA `layouts` test with what time is left.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && [ -f $b/cubecl-cache.tgz ] && tar xzf $b/cubecl-cache.tgz -C target && echo restored cubecl cache
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $OUT/env.txt 2>&1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( 560 - ($(date +%s) - start) )); }
t kernel tests
RUST_BACKTRACE=1 timeout 150 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"
grep -E "^test |panicked|test result" $OUT/kernels-cuda.txt | head -12
t stages
for shape in small dsv3; do
  timeout 70 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what layer,router,stages \
     --warmup 2 --reps 7 --out $OUT/stages.jsonl | cut -c1-170
done
t ncu small fwd
timeout 100 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  $b/moe-gpu-bench --backend cuda --shape small --mode fwd --tokens 8192 --what layer --warmup 1 --reps 1 \
  > $OUT/ncu-small-fwd.csv 2> $OUT/ncu-small-fwd.err
echo "ncu exit $? lines $(wc -l < $OUT/ncu-small-fwd.csv)"
t tile sweep
for tile in 128x128 256x128 128x256; do
  for shape in dsv3 small; do
    MOE_GEMM_TILE=$tile MOE_GEMM_WARP=64x64 timeout 40 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd \
      --tokens 8192 --what gemm,gemm_wgrad --warmup 2 --reps 5 --out $OUT/tiles-$tile.jsonl | cut -c1-150 | sed "s/^/$tile /"
  done
done
t layouts
l=$(left); [ $l -gt 60 ] && RUST_BACKTRACE=1 timeout $l $b/layouts --nocapture on_cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"
grep -E "^test |panicked|test result" $OUT/layouts-cuda.txt | head
t done
# The autotune results and compiled kernels, for the next call's start.
du -sh target/* 2>/dev/null
tar czf $OUT/cubecl-cache.tgz --exclude=./release --exclude=./debug -C target . && ls -la $OUT/cubecl-cache.tgz
