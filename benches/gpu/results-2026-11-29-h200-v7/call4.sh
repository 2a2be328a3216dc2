#!/usr/bin/env bash
# Call 4, on call 3's build (version 18, no code change since): the kernel tests, the device
# time of one small forward+backward and one forward under Nsight Compute, and the small table
# again (ours and PyTorch in one command) for the spread between calls.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && [ -f $b/cubecl-cache.tgz ] && tar xzf $b/cubecl-cache.tgz -C target && echo restored cubecl cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > $OUT/env.txt 2>&1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
t kernel tests
RUST_BACKTRACE=1 timeout 80 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result" $OUT/kernels-cuda.txt
RUST_BACKTRACE=1 timeout 60 $b/layouts --nocapture --test-threads 1 cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"; grep -E "test result" $OUT/layouts-cuda.txt
for mode in fwd fwdbwd; do
  t ncu $mode
  timeout 90 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    $b/moe-gpu-bench --backend cuda --shape small --mode $mode --tokens 8192 --what layer --warmup 1 --reps 1 \
    > $OUT/ncu-small-$mode.csv 2> $OUT/ncu-small-$mode.err
  echo "ncu $mode exit $?"
done
t small and torch
$b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 4096,8192,16384 --what layer \
   --timeout 120 --torch-timeout 200 --out $OUT/bench > /dev/null 2>&1
grep -E "^\| small" $OUT/bench/table.md
tar czf $OUT/bench.tgz -C $OUT bench && rm -rf $OUT/bench
t done
