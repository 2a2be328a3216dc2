#!/usr/bin/env bash
# Call 5: the grouped-GEMM and dense-product kernel tests after the review's kernel refactor.
set -u
OUT=$1
gunzip -f .gpu-bin/cube_kernels.gz && chmod +x .gpu-bin/cube_kernels
RUST_BACKTRACE=1 timeout 150 .gpu-bin/cube_kernels --nocapture --test-threads 1 grouped_gemm_matches_the_host_loop_on_cuda dense_product_matches_the_host_loop_on_cuda > $OUT/kernels-cuda.txt 2>&1
echo "cube_kernels exit $?"
grep -E "tensor cores true" $OUT/kernels-cuda.txt | awk '{print $(NF-2)}' | sort -g | tail -1 | sed 's/^/largest tensor-core error /'
grep -E "^test |dense product|panicked|over|test result" $OUT/kernels-cuda.txt | head -20
