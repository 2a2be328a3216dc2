#!/usr/bin/env bash
# Call 1: version 23, the gate and the SwiGLU activation with their own backward. Kernel tests
# on CUDA (the gate and its backward, silu_mul, wgmma, combine) and layouts; version 22
# (moe-gpu-bench-v22, the commit before) against version 23 interleaved on the small layer rows,
# forward and forward+backward, two rounds; then the table (ours and PyTorch in one command).
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > $OUT/env.txt 2>&1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - start) )); }
t kernel tests
RUST_BACKTRACE=1 timeout 150 $b/cube_kernels --nocapture --test-threads 1 gate silu wgmma combine > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result|panicked|^gate|^silu" $OUT/kernels-cuda.txt | head -30
RUST_BACKTRACE=1 timeout 90 $b/layouts --nocapture --test-threads 1 cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"; grep -E "test result|panicked" $OUT/layouts-cuda.txt
t ab
for round in 1 2; do
  for v in v22 v23; do
    bin=$b/moe-gpu-bench; [ $v = v22 ] && bin=$b/moe-gpu-bench-v22
    for mode in fwd fwdbwd; do
      timeout 60 $bin --backend cuda --shape small --mode $mode --tokens 4096,8192,16384 \
        --what layer --warmup 3 --reps 10 --out $OUT/ab-$v.jsonl | cut -c1-150 | sed "s/^/$v r$round /"
    done
  done
  t round $round
done
t table
l=$(left); [ $l -gt 200 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd \
   --tokens 4096,8192,16384 --what layer --timeout 100 --torch-timeout 200 --out $OUT/bench > /dev/null 2>&1
grep -E "^\| small" $OUT/bench/table.md
l=$(left); [ $l -gt 60 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd,fwdbwd \
   --tokens 4096,8192,16384 --what layer --timeout $(( l - 20 )) --skip-torch --append --out $OUT/bench > /dev/null 2>&1
grep -E "^\| dsv3" $OUT/bench/table.md
tar czf $OUT/bench.tgz -C $OUT bench && rm -rf $OUT/bench
t done
