#!/bin/bash
# Compile every .cu here to an sm_90a cubin, then test and time them against torch.
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
ls *.cu | xargs -P 16 -I{} sh -c 'nvcc -cubin -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -O3 {} -o $(basename {} .cu).cubin > $(basename {} .cu).log 2>&1 || echo FAIL {}'
grep -h "registers\|spill" *.log | sort | uniq -c | head -40
mkdir -p $OUT/logs; cp *.log $OUT/logs/
for f in moe_wgmma_bf16_rows_bn_n256_s4.cubin moe_wgmma_bf16_rows_bn_n128_s4.cubin; do echo "$f HGMMA: $(cuobjdump --dump-sass $f | grep -c HGMMA)"; done
timeout 300 python3 harness.py . 2>&1 | tail -80
