#!/usr/bin/env bash
# Call 2: layouts on CUDA with room for a cold kernel cache (call 1's 90 s ran out while
# cubecl compiled); version 22 against version 23 on the small forward+backward again (call 1's
# first round lost version 22's rows to the 60 s limit while it compiled); then the table again
# on version 23 (its spread between calls).
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
t layouts
RUST_BACKTRACE=1 timeout 200 $b/layouts --nocapture --test-threads 1 cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"; grep -E "test result|panicked" $OUT/layouts-cuda.txt
t ab
for round in 1 2; do
  for v in v22 v23; do
    bin=$b/moe-gpu-bench; [ $v = v22 ] && bin=$b/moe-gpu-bench-v22
    timeout 120 $bin --backend cuda --shape small --mode fwdbwd --tokens 4096,8192,16384 \
      --what layer --warmup 3 --reps 10 --out $OUT/ab-$v.jsonl | cut -c1-150 | sed "s/^/$v r$round /"
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
