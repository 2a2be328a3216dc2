#!/usr/bin/env bash
# Call 3: the shared experts before the router (version 18) against call 2's build (version 17,
# moe-gpu-bench-v17), interleaved in one call; then the table on version 18: ours and PyTorch
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
for round in 1 2 3; do
  for v in v17 v18; do
    bin=$b/moe-gpu-bench; [ $v = v17 ] && bin=$b/moe-gpu-bench-v17
    for mode in fwd fwdbwd; do
      timeout 60 $bin --backend cuda --shape small --mode $mode --tokens 4096,8192,16384 \
        --what layer --warmup 3 --reps 10 --out $OUT/ab-$v.jsonl | cut -c1-120 | sed "s/^/$v r$round /"
    done
  done
  t round $round
done
t small and torch
$b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 4096,8192,16384 --what layer \
   --timeout 120 --torch-timeout 200 --out $OUT/bench 2>&1 | grep -E "^(ours|pytorch)|exit" | cut -c1-200
for tok in 8192 4096 16384; do
  l=$(left); [ $l -gt 40 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd,fwdbwd --tokens $tok --what layer \
     --timeout $(( l - 10 < 120 ? l - 10 : 120 )) --skip-torch --append --out $OUT/bench > /dev/null 2>&1
  t dsv3 $tok
done
grep -E "^\| (small|dsv3)" $OUT/bench/table.md
tar czf $OUT/bench.tgz -C $OUT bench && rm -rf $OUT/bench
tar czf $OUT/cubecl-cache.tgz --exclude=./release --exclude=./debug -C target . 2>/dev/null
t done
