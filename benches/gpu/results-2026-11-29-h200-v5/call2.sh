#!/usr/bin/env bash
# Call 2: the re-bounded tests, GEMM rows, stage rows, small fwd+bwd (warms the autotune cache), wgpu small.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
t tests
RUST_BACKTRACE=1 timeout 100 $b/cube_kernels --nocapture --test-threads 1 dense_product_matches_the_host_loop_on_cuda > $OUT/kernels-cuda-dense.txt 2>&1; k=$?
RUST_BACKTRACE=1 timeout 100 $b/layouts --nocapture on_cuda > $OUT/layouts-cuda.txt 2>&1; l=$?
echo "dense exit $k, layouts exit $l"
grep -E "^test |relative error|panicked|test result" $OUT/kernels-cuda-dense.txt $OUT/layouts-cuda.txt | head -20
t gemm
for shape in dsv3 small; do
  timeout 90 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what gemm,gemm_wgrad,gemm_down \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-180
done
t stages
for shape in small dsv3; do
  timeout 120 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what layer,router,stages \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-180
done
t small fwdbwd
timeout 200 $b/moe-gpu-bench --backend cuda --shape small --mode fwdbwd --tokens 8192 --what layer \
     --warmup 2 --reps 5 --out $OUT/rows.jsonl | cut -c1-180
[ -d target/autotune ] && tar czf $OUT/autotune.tgz -C target autotune && ls -la $OUT/autotune.tgz
t wgpu
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
[ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
left=$(( 560 - ($(date +%s) - start) ))
echo "wgpu gets $left s"
[ $left -gt 60 ] && RUST_BACKTRACE=1 timeout $left $b/xtask bench --backend wgpu --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 8192 \
   --what layer --timeout $(( left / 2 )) --skip-torch --out $OUT/bench-wgpu 2>&1 | tail -15
t done
