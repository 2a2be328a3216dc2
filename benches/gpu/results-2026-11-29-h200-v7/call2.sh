#!/usr/bin/env bash
# Call 2: the flush of cubecl's queue no longer waits for its thread. Kernel tests on this
# build, the MOE_FLUSH before/after again (small, two rounds), then the table: ours and PyTorch
# in one command (small, every token count), dsv3 rows after it while time is left.
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
RUST_BACKTRACE=1 timeout 60 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result" $OUT/kernels-cuda.txt
RUST_BACKTRACE=1 timeout 60 $b/layouts --nocapture --test-threads 1 cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"; grep -E "test result" $OUT/layouts-cuda.txt
for round in 1 2; do
  for policy in off fusion all; do
    for mode in fwd fwdbwd; do
      MOE_FLUSH=$policy timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode $mode --tokens 4096,8192,16384 \
        --what layer --warmup 3 --reps 10 --out $OUT/flush-$policy.jsonl | cut -c1-120 | sed "s/^/$policy r$round /"
    done
  done
  t round $round
done
t small and torch
$b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 4096,8192,16384 --what layer \
   --timeout 120 --torch-timeout 200 --out $OUT/bench 2>&1 | grep -E "^(ours|pytorch)|exit" | cut -c1-200
for tok in 8192 4096 16384; do
  l=$(left); [ $l -gt 40 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd,fwdbwd --tokens $tok --what layer \
     --timeout $(( l - 10 < 120 ? l - 10 : 120 )) --skip-torch --append --out $OUT/bench 2>&1 | grep -E "^ours|exit" | cut -c1-200
  t dsv3 $tok
done
cat $OUT/bench/table.md 2>/dev/null | tail -16
t done
