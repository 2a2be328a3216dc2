#!/usr/bin/env bash
# Call 4: the final table: ours and PyTorch in one command (small: T 4096, 8192, 16384; dsv3: T 8192,
# then the other token counts while time is left), GEMM rows first.
set -u
OUT=$1
b=.gpu-bin
for f in $b/*.gz; do gunzip -f "$f"; done
chmod +x $b/*
export CUBECL_AUTOTUNE_LEVEL=minimal
mkdir -p target && tar xzf $b/autotune.tgz -C target && echo restored autotune
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > $OUT/env.txt 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >> $OUT/env.txt 2>&1
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*"; }
left() { echo $(( 565 - ($(date +%s) - start) )); }
t tests
RUST_BACKTRACE=1 timeout 100 $b/cube_kernels --nocapture --test-threads 1 grouped_gemm_matches_the_host_loop_on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "grouped gemm test exit $?"
grep -E "tensor cores true" $OUT/kernels-cuda.txt | awk '{print $(NF-2)}' | sort -g | tail -1 | sed 's/^/largest tensor-core error /'
grep -E "panicked|over|test result" $OUT/kernels-cuda.txt | head -5
t gemm
for shape in dsv3 small; do
  timeout 60 $b/moe-gpu-bench --backend cuda --shape $shape --mode fwd --tokens 8192 --what gemm,gemm_wgrad,gemm_down \
     --warmup 2 --reps 5 --out $OUT/gemm.jsonl | cut -c1-150
done
t small and torch
$b/xtask bench --backend cuda --prebuilt $b --shapes small --modes fwd,fwdbwd --tokens 4096,8192,16384 --what layer \
   --timeout 140 --torch-timeout 210 --out $OUT/bench 2>&1 | grep -E "^(ours|pytorch)|exit" | cut -c1-200
t dsv3 8192
l=$(left); [ $l -gt 60 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd,fwdbwd --tokens 8192 --what layer \
   --timeout $(( l / 2 < 150 ? l / 2 : 150 )) --skip-torch --append --out $OUT/bench 2>&1 | grep -E "^ours|exit" | cut -c1-200
t dsv3 others
l=$(left); [ $l -gt 50 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwd --tokens 4096,16384 --what layer \
   --timeout $(( l - 10 )) --skip-torch --append --out $OUT/bench 2>&1 | grep -E "^ours|exit" | cut -c1-200
l=$(left); [ $l -gt 50 ] && $b/xtask bench --backend cuda --prebuilt $b --shapes dsv3 --modes fwdbwd --tokens 4096,16384 --what layer \
   --timeout $(( l - 10 )) --skip-torch --append --out $OUT/bench 2>&1 | grep -E "^ours|exit" | cut -c1-200
t done
cat $OUT/bench/table.md 2>/dev/null | tail -16
