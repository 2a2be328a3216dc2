#!/usr/bin/env bash
# Call 6: the table again on the final build (its spread between calls), then the small T 4096
# rows, the host-bound ones, three more times beside PyTorch's script on T 4096 twice.
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
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - start) )); }
t table
$b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd \
   --tokens 4096,8192,16384 --what layer --timeout 100 --torch-timeout 200 --out $OUT/bench > /dev/null 2>&1
grep -E "^\| small" $OUT/bench/table.md
l=$(left); [ $l -gt 150 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd,fwdbwd \
   --tokens 4096,8192,16384 --what layer --timeout 100 --skip-torch --append --out $OUT/bench > /dev/null 2>&1
grep -E "^\| dsv3" $OUT/bench/table.md
tar czf $OUT/bench.tgz -C $OUT bench && rm -rf $OUT/bench
t small T 4096 rounds
# PyTorch's script on the small layer alone (its dsv3 per-expert loop takes minutes).
sed -e '/for T in tokens or \[8192\]:/d' -e '/run(f"dsv3_T{T}"/d' $b/torch_moe_bench.py > $OUT/torch_small.py
for round in 1 2; do
  for mode in fwd fwdbwd; do
    timeout 40 $b/moe-gpu-bench --backend cuda --shape small --mode $mode --tokens 4096 \
      --what layer --warmup 3 --reps 10 --out $OUT/t4096.jsonl | cut -c1-140 | sed "s/^/r$round /"
  done
  l=$(left); [ $l -gt 80 ] && timeout 75 python3 $OUT/torch_small.py $OUT/torch-4096-r$round.json 4096 > $OUT/torch-4096-r$round.txt 2>&1
  grep -E "grouped" $OUT/torch-4096-r$round.txt | cut -c1-150
done
t done
