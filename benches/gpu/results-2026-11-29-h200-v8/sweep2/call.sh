#!/bin/bash
cd "$(dirname "$0")"
ls *.cu | xargs -P 16 -I{} sh -c 'nvcc -cubin -gencode=arch=compute_90a,code=sm_90a -O3 {} -o $(basename {} .cu).cubin > /dev/null 2>&1 || echo FAIL {}'
timeout 300 python3 harness2.py . 2>&1 | tail -30
