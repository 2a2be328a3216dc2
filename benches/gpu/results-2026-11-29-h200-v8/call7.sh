#!/usr/bin/env bash
# Call 7: the sigmoid gate as one kernel (version 22). Kernel tests on CUDA (gate, selection,
# wgmma, dense product) and layouts; version 21 (call 6's build, moe-gpu-bench-v21) against
# version 22 interleaved on the forward rows; then the table (ours and PyTorch in one command).
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
left() { echo $(( ${BUDGET:-520} - ($(date +%s) - start) )); }
t kernel tests
RUST_BACKTRACE=1 timeout 100 $b/cube_kernels --nocapture --test-threads 1 gate selection wgmma dense > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result|panicked|^gate" $OUT/kernels-cuda.txt | head -12
RUST_BACKTRACE=1 timeout 60 $b/layouts --nocapture --test-threads 1 cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"; grep -E "test result|panicked" $OUT/layouts-cuda.txt
t ab
for round in 1 2; do
  for v in v21 v22; do
    bin=$b/moe-gpu-bench; [ $v = v21 ] && bin=$b/moe-gpu-bench-v21
    timeout 40 $bin --backend cuda --shape small --mode fwd --tokens 4096,8192,16384 \
      --what layer,router --warmup 3 --reps 10 --out $OUT/ab-$v.jsonl | cut -c1-140 | sed "s/^/$v r$round /"
    timeout 40 $bin --backend cuda --shape dsv3 --mode fwd --tokens 8192 \
      --what layer --warmup 2 --reps 5 --out $OUT/ab-$v.jsonl | cut -c1-140 | sed "s/^/$v r$round /"
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
