#!/usr/bin/env bash
# Call 4: the final table on the final build: kernel tests, the isolated GEMM under ncu (device
# time against the row's wall time), then ours and PyTorch in one command (PyTorch runs both
# shapes at each token count in the small call), dsv3 rows after it while time is left.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && [ -f $b/cubecl-cache.tgz ] && tar xzf $b/cubecl-cache.tgz -C target && echo restored cubecl cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > $OUT/env.txt 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >> $OUT/env.txt 2>&1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( 580 - ($(date +%s) - start) )); }
t kernel tests
RUST_BACKTRACE=1 timeout 90 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"
grep -E "^test |panicked|test result" $OUT/kernels-cuda.txt | head -8
t ncu gemm
timeout 40 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  $b/moe-gpu-bench --backend cuda --shape small --mode fwd --tokens 8192 --what gemm --warmup 1 --reps 1 \
  > $OUT/ncu-small-gemm.csv 2>&1
grep -E "grouped_gemm|median" $OUT/ncu-small-gemm.csv | cut -c1-200 | tail -3
t small and torch
$b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 4096,8192,16384 --what layer \
   --timeout 200 --torch-timeout 230 --out $OUT/bench 2>&1 | grep -E "^(ours|pytorch)|exit" | cut -c1-200
t dsv3 8192
l=$(left); [ $l -gt 60 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd,fwdbwd --tokens 8192 --what layer \
   --timeout $(( l - 10 < 170 ? l - 10 : 170 )) --skip-torch --append --out $OUT/bench 2>&1 | grep -E "^ours|exit" | cut -c1-200
t dsv3 others
l=$(left); [ $l -gt 50 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd --tokens 4096,16384 --what layer \
   --timeout $(( l - 10 )) --skip-torch --append --out $OUT/bench 2>&1 | grep -E "^ours|exit" | cut -c1-200
t done
cat $OUT/bench/table.md 2>/dev/null | tail -16
