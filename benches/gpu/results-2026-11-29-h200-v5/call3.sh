#!/usr/bin/env bash
# Call 3: kernel tests after the loop split, GEMM rows, stage rows; warms the autotune cache for call 4.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && tar xzf $b/autotune.tgz -C target && echo restored autotune
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
t tests
RUST_BACKTRACE=1 timeout 120 $b/cube_kernels --nocapture --test-threads 1 grouped_gemm_matches_the_host_loop_on_cuda > $OUT/kernels-cuda.txt 2>&1; k=$?
RUST_BACKTRACE=1 timeout 120 $b/layouts --nocapture on_cuda > $OUT/layouts-cuda.txt 2>&1; l=$?
echo "grouped gemm exit $k, layouts exit $l"
grep -E "tensor cores true" $OUT/kernels-cuda.txt | awk '{print $(NF-2)}' | sort -g | tail -1 | sed 's/^/largest tensor-core error /'
grep -E "^test |panicked|over|test result|route" $OUT/kernels-cuda.txt $OUT/layouts-cuda.txt | head -20
t gemm
for shape in dsv3 small; do
  timeout 90 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what gemm,gemm_wgrad,gemm_down \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-150
done
t stages
for shape in small dsv3; do
  timeout 100 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what layer,router,stages \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-150
done
t dsv3 fwdbwd warm
timeout 150 $b/moe-gpu-bench --backend cuda --shape dsv3 --mode fwdbwd --tokens 8192 --what layer \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-150
tar czf $OUT/autotune.tgz -C target autotune
t done
