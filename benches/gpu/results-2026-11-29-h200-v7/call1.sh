#!/usr/bin/env bash
# Call 1: does handing queued work to the device early (MOE_FLUSH) shorten the layer? The same
# rows under MOE_FLUSH=off, fusion and all, one binary, interleaved by policy, then PyTorch's
# script in the same call; the kernel tests on the new build first.
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
[ -x $b/cube_kernels ] && RUST_BACKTRACE=1 timeout 60 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result" $OUT/kernels-cuda.txt
for round in 1 2; do
  for policy in off fusion all; do
    for mode in fwd fwdbwd; do
      MOE_FLUSH=$policy timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode $mode --tokens 4096,8192,16384 \
        --what layer --warmup 3 --reps 10 --out $OUT/flush-$policy.jsonl | cut -c1-120 | sed "s/^/$policy r$round /"
    done
  done
  t round $round
done
for policy in off all; do
  MOE_FLUSH=$policy timeout 60 $b/moe-gpu-bench --backend cuda --shape dsv3 --mode fwd --tokens 8192 \
    --what layer --warmup 2 --reps 5 --out $OUT/flush-$policy.jsonl | cut -c1-120 | sed "s/^/$policy /"
done
t torch
timeout 200 python3 $b/torch_moe_bench.py $OUT/torch.json 4096,8192,16384 > $OUT/torch.txt 2>&1
echo "torch exit $?"; grep -E "grouped" $OUT/torch.txt | cut -c1-160
mkdir -p $OUT/cache && tar czf $OUT/cubecl-cache.tgz --exclude=./release --exclude=./debug -C target . 2>/dev/null
t done
