#!/usr/bin/env bash
# Call 3 (calls 1-2 ran the standalone sweep, sweep/): the wgmma kernel inside burn-moe. Kernel
# tests on CUDA, then MOE_WGMMA=off (the cube kernels) against on, interleaved in two rounds:
# the GEMMs alone (dsv3 and small) and the layer rows; then the table (small with PyTorch, dsv3).
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
RUST_BACKTRACE=1 timeout 150 $b/cube_kernels --nocapture --test-threads 1 on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"; grep -E "test result|wgmma\)|panicked|declined" $OUT/kernels-cuda.txt | cut -c1-150 | head -40
RUST_BACKTRACE=1 timeout 90 $b/layouts --nocapture --test-threads 1 cuda > $OUT/layouts-cuda.txt 2>&1
echo "layouts exit $?"; grep -E "test result|panicked" $OUT/layouts-cuda.txt
t ab
for round in 1 2; do
  for w in off on; do
    MOE_WGMMA=$w timeout 60 $b/moe-gpu-bench --backend cuda --shape dsv3 --mode fwd --tokens 8192 \
      --what gemm,gemm_wgrad,gemm_down --warmup 2 --reps 5 --out $OUT/ab-$w.jsonl | cut -c1-140 | sed "s/^/$w r$round /"
    MOE_WGMMA=$w timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode fwd --tokens 16384 \
      --what gemm,gemm_wgrad,gemm_down --warmup 2 --reps 5 --out $OUT/ab-$w.jsonl | cut -c1-140 | sed "s/^/$w r$round /"
    for mode in fwd fwdbwd; do
      MOE_WGMMA=$w timeout 60 $b/moe-gpu-bench --backend cuda --shape small --mode $mode --tokens 4096,8192,16384 \
        --what layer --warmup 3 --reps 10 --out $OUT/ab-$w.jsonl | cut -c1-140 | sed "s/^/$w r$round /"
    done
    for mode in fwd fwdbwd; do
      MOE_WGMMA=$w timeout 60 $b/moe-gpu-bench --backend cuda --shape dsv3 --mode $mode --tokens 8192 \
        --what layer --warmup 2 --reps 5 --out $OUT/ab-$w.jsonl | cut -c1-140 | sed "s/^/$w r$round /"
    done
  done
  t round $round
done
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
