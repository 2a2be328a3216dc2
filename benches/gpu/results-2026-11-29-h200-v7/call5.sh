#!/usr/bin/env bash
# Call 5: the combine's weight gradient as one kernel (version 19). Kernel tests on this build,
# version 19 against call 3's build (version 18, moe-gpu-bench-v18) interleaved, then the small
# table on version 19 (ours and PyTorch in one command), and dsv3 forward+backward rows while
# time is left.
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
left() { echo $(( ${BUDGET:-330} - ($(date +%s) - start) )); }
t kernel tests
RUST_BACKTRACE=1 timeout 80 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result|pair dots" $OUT/kernels-cuda.txt
RUST_BACKTRACE=1 timeout 60 $b/layouts --nocapture --test-threads 1 cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"; grep -E "test result" $OUT/layouts-cuda.txt
for round in 1 2; do
  for v in v18 v19; do
    bin=$b/moe-gpu-bench; [ $v = v18 ] && bin=$b/moe-gpu-bench-v18
    timeout 40 $bin --backend cuda --shape small --mode fwdbwd --tokens 4096,8192,16384 \
      --what layer --warmup 3 --reps 10 --out $OUT/ab-$v.jsonl | cut -c1-120 | sed "s/^/$v r$round /"
  done
  t round $round
done
t small and torch
$b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 4096,8192,16384 --what layer \
   --timeout 100 --torch-timeout 200 --out $OUT/bench > /dev/null 2>&1
grep -E "^\| small" $OUT/bench/table.md
l=$(left); [ $l -gt 40 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwdbwd --tokens 8192 --what layer \
   --timeout $(( l - 5 )) --skip-torch --append --out $OUT/bench > /dev/null 2>&1
t dsv3; grep -E "^\| dsv3" $OUT/bench/table.md
tar czf $OUT/bench.tgz -C $OUT bench && rm -rf $OUT/bench
t done
