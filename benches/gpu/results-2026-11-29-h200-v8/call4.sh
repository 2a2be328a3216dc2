#!/usr/bin/env bash
# Call 4: the wgmma kernel's text built once per variant (call 3 built it at every launch; the
# small layer's forward+backward spent about 1 ms more on the host with it). MOE_WGMMA off
# against on again on the small layer rows, interleaved; where the small T 4096 forward's time
# goes (stages, router, launches); then the whole table again, for its spread between calls.
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
t kernel tests
RUST_BACKTRACE=1 timeout 150 $b/cube_kernels --nocapture --test-threads 1 wgmma > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result|panicked" $OUT/kernels-cuda.txt
t ab
for round in 1 2; do
  for w in off on; do
    for mode in fwd fwdbwd; do
      MOE_WGMMA=$w timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode $mode --tokens 4096,8192,16384 \
        --what layer --warmup 3 --reps 10 --out $OUT/ab-$w.jsonl | cut -c1-140 | sed "s/^/$w r$round /"
    done
  done
  t round $round
done
timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode fwd --tokens 4096 --what stages,router,launches \
  --warmup 3 --reps 10 --out $OUT/stages.jsonl | cut -c1-140
t table
l=$(left); [ $l -gt 150 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd \
   --tokens 4096,8192,16384 --what layer --timeout 100 --torch-timeout 200 --out $OUT/bench > /dev/null 2>&1
grep -E "^\| small" $OUT/bench/table.md
l=$(left); [ $l -gt 60 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd,fwdbwd \
   --tokens 4096,8192,16384 --what layer --timeout $(( l - 30 )) --skip-torch --append --out $OUT/bench > /dev/null 2>&1
grep -E "^\| dsv3" $OUT/bench/table.md
tar czf $OUT/bench.tgz -C $OUT bench && rm -rf $OUT/bench
tar czf $OUT/cubecl-cache.tgz --exclude=./release --exclude=./debug -C target . 2>/dev/null
t done
