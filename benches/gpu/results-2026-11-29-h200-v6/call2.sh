#!/usr/bin/env bash
# Call 2: fewer launches in the forward (no zero fills where every slot is written, no slice of
# the plan's summary, the combine reads f32 weights as they are): kernel tests, the host's cost
# per launch, stage and layer rows, and the tile sweep on the down projection's shape.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && [ -f $b/cubecl-cache.tgz ] && tar xzf $b/cubecl-cache.tgz -C target && echo restored cubecl cache
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
t kernel tests
RUST_BACKTRACE=1 timeout 150 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"
grep -E "^test |combine|panicked|test result" $OUT/kernels-cuda.txt | head -16
t launches, stages
for shape in small dsv3; do
  timeout 80 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what layer,router,stages,launches \
     --warmup 2 --reps 7 --out $OUT/stages.jsonl | cut -c1-170
done
t tile sweep
for tile in 128x128 128x256; do
  for shape in dsv3 small; do
    MOE_GEMM_TILE=$tile MOE_GEMM_WARP=64x64 timeout 40 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd \
      --tokens 8192 --what gemm_down --warmup 2 --reps 5 --out $OUT/tiles.jsonl | cut -c1-150 | sed "s/^/$tile /"
  done
done
for tile in 128x128 128x256; do
  MOE_GEMM_TILE=$tile MOE_GEMM_WARP=64x64 timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode fwd \
    --tokens 4096,16384 --what gemm,gemm_wgrad,gemm_down --warmup 2 --reps 5 --out $OUT/tiles.jsonl | cut -c1-150 | sed "s/^/$tile /"
  MOE_GEMM_TILE=$tile MOE_GEMM_WARP=64x64 timeout 40 $b/moe-gpu-bench --backend cuda --shape small --mode fwd \
    --tokens 8192 --what layer --warmup 2 --reps 9 --out $OUT/tiles.jsonl | cut -c1-150 | sed "s/^/$tile /"
done
t done
tar czf $OUT/cubecl-cache.tgz --exclude=./release --exclude=./debug -C target . && ls -la $OUT/cubecl-cache.tgz
