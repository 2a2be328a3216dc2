#!/usr/bin/env bash
# Call 1: kernel correctness on CUDA, GEMM rows, small layer rows (warms the autotune cache), stages.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/env.txt 2>&1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
t tests
RUST_BACKTRACE=1 timeout 200 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1; k=$?
RUST_BACKTRACE=1 timeout 100 $b/layouts --nocapture on_cuda > $OUT/layouts-cuda.txt 2>&1; l=$?
echo "cube_kernels exit $k, layouts exit $l"
grep -E "^test |relative error|panicked|seed" $OUT/kernels-cuda.txt | head -90
grep -E "^test |panicked|test result" $OUT/layouts-cuda.txt | head
if [ $k -ne 0 ] || [ $l -ne 0 ]; then grep -B2 -A30 panicked $OUT/layouts-cuda.txt | head -60; exit 1; fi
t gemm
for shape in dsv3 small; do
  timeout 90 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what gemm,gemm_wgrad,gemm_down \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-200
done
t small layer
timeout 330 $b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 4096,8192,16384 \
   --what layer --timeout 160 --skip-torch --out $OUT/bench 2>&1 | tail -25
t stages
for shape in small dsv3; do
  timeout 80 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what layer,router,stages \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-200
done
t done
[ -d target/autotune ] && tar czf $OUT/autotune.tgz -C target autotune
ls -la target/autotune 2>/dev/null | head -3
