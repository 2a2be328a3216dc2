#!/usr/bin/env bash
# The H200 measurements of docs/performance.md ("H200"), for a GPU machine without cargo.
#
# Here (with cargo), once:
#   CARGO_TARGET_DIR=... cargo build --release -p moe-benches --features cuda --bin moe-gpu-bench
#   CARGO_TARGET_DIR=... cargo build --release -p moe-runner --features cuda
#   cargo build --release -p xtask
#   copy moe-gpu-bench, moe-runner, xtask and ../shared/tools/torch_moe_bench.py into .gpu-bin/
#   (ignored through .git/info/exclude)
# There, from the repository's root:
#   benches/gpu/run-h200.sh bench OUT    # small fwd + fwd+bwd, PyTorch, DeepSeek-V3 fwd
#   benches/gpu/run-h200.sh train OUT    # training tokens/s (MoE small, then dense)
#   benches/gpu/run-h200.sh dsv3bwd OUT  # DeepSeek-V3 fwd+bwd
#   benches/gpu/run-h200.sh kernels OUT  # kernel tests on CUDA and on NVIDIA's Vulkan (wgpu), tile sweep
#   benches/gpu/run-h200.sh stages OUT   # the layer forward's pieces timed one at a time
# `kernels` also needs the test binaries, built here with
#   CARGO_TARGET_DIR=... cargo test --release -p moe-kernels --features cuda,wgpu --test cube_kernels --test layouts --no-run
# and copied into .gpu-bin/ as cube_kernels and layouts, and the Vulkan loader debs in .gl/
# (the device library's README says how to fetch them).
# Every piece runs under a time limit, so one hang does not take the rest with it.
#
# cubecl autotunes every new matmul shape on its first call (30-155 s a layer shape on the
# H200, docs/performance.md) and keeps the results in target/autotune. The script saves that
# folder to OUT/autotune.tgz and restores it from $bin/autotune.tgz when present: copy a
# previous call's file into .gpu-bin/ and the next call skips the tuning it already did.
# CUBECL_AUTOTUNE_LEVEL=minimal|balanced|extensive|full (cubecl's variable) is passed through.
set -u
phase=$1
out=$2
bin=${GPU_BIN:-.gpu-bin}
mkdir -p "$out"
if [ -f "$bin/autotune.tgz" ] && [ ! -d target/autotune ]; then
    mkdir -p target && tar xzf "$bin/autotune.tgz" -C target && echo "restored target/autotune"
fi
save_cache() { [ -d target/autotune ] && tar czf "$out/autotune.tgz" -C target autotune; }
trap save_cache EXIT

peak_of() { sort -n "$1" | tail -1; }

case $phase in
bench)
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
        python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    # WHAT=layer,router skips the dense comparison rows (their first calls autotune burn's matmul).
    "$bin/xtask" bench --backend cuda --prebuilt "$bin" --shapes small --out "$out/bench" \
        --timeout "${SMALL_TIMEOUT:-110}" --torch-timeout 170 ${WHAT:+--what "$WHAT"}
    "$bin/xtask" bench --backend cuda --prebuilt "$bin" --shapes dsv3 --modes "${DSV3_MODES:-fwd}" --skip-torch \
        --append --out "$out/bench" --timeout "${DSV3_TIMEOUT:-170}" ${WHAT:+--what "$WHAT"}
    ;;
train)
    steps=${STEPS:-40}
    for arm in ${ARMS:-moe dense}; do
        extra=()
        if [ "$arm" = dense ]; then
            extra=(--set model.first_k_dense_replace=8 --set model.intermediate_size=2048)
        fi
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"/tmp/mem-$arm.csv" 2>/dev/null &
        sampler=$!
        start=$(date +%s)
        timeout "${TRAIN_TIMEOUT:-240}" "$bin/moe-runner" train --backend cuda --config configs/small.toml \
            --run-dir "/tmp/run-$arm" --set train.steps="$steps" --set train.eval_every=0 \
            --set train.eval_batches=2 --set train.checkpoint_every=0 "${extra[@]}"
        echo "train $arm: exit $? after $(( $(date +%s) - start )) s; GPU memory used peak $(peak_of /tmp/mem-$arm.csv) MiB (first sample $(head -1 /tmp/mem-$arm.csv) MiB)"
        kill "$sampler" 2>/dev/null
        cp "/tmp/run-$arm/metrics.jsonl" "$out/train-$arm.jsonl" 2>/dev/null
    done
    ;;
stages)
    # The forward's pieces one at a time (moe-gpu-bench --what stages), beside the whole layer.
    for shape in small dsv3; do
        timeout "${STAGES_TIMEOUT:-150}" "$bin/moe-gpu-bench" --shape $shape --mode fwd --tokens "${STAGE_TOKENS:-4096,8192}" \
            --what layer,router,stages --warmup 2 --reps 5 --out "$out/stages-$shape.jsonl"
    done
    ;;
dsv3bwd)
    "$bin/xtask" bench --backend cuda --prebuilt "$bin" --shapes dsv3 --modes fwdbwd --skip-torch \
        --out "$out/bench" --timeout "${DSV3_BWD_TIMEOUT:-200}"
    ;;
kernels)
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$out/env.txt" 2>&1
    RUST_BACKTRACE=1 timeout 180 "$bin/cube_kernels" --nocapture --test-threads 1 on_cuda >"$out/kernels-cuda.txt" 2>&1
    echo "cuda kernel tests: exit $?"; grep -E "^test |relative error|tensor-core" "$out/kernels-cuda.txt" | head -80
    # Tile sweep: TILES lists tile:warp pairs (MOE_GEMM_TILE and MOE_GEMM_WARP), PIPES the
    # pipelined kernel's depth x stages (MOE_GEMM_PIPE).
    for shape in dsv3 small; do
        for cfg in ${TILES:-128x128:64x64 128x64:64x32 64x128:32x64}; do
            for pipe in ${PIPES:-32x3}; do
                tile=${cfg%%:*} warp=${cfg#*:}
                MOE_GEMM_TILE=$tile MOE_GEMM_WARP=$warp MOE_GEMM_PIPE=$pipe timeout 90 "$bin/moe-gpu-bench" \
                    --shape $shape --mode fwd --tokens ${GEMM_TOKENS:-8192} --what gemm,gemm_wgrad --warmup 2 --reps 5 \
                    --out "$out/gemm-$shape.jsonl" | sed "s/^/$cfg $pipe /"
            done
        done
    done
    # NVIDIA's Vulkan through wgpu: the loader comes from .gl/; keep the first panic's backtrace.
    if [ -d .gl ] && [ -z "${SKIP_WGPU:-}" ]; then
        for f in .gl/*.deb; do dpkg -x "$f" /; done
        ldconfig
        [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] &&
            export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
        RUST_BACKTRACE=1 timeout 150 "$bin/cube_kernels" --nocapture --test-threads 1 on_wgpu >"$out/kernels-wgpu.txt" 2>&1
        echo "wgpu kernel tests: exit $?"; grep -m1 -A40 panicked "$out/kernels-wgpu.txt"; grep -E "^test " "$out/kernels-wgpu.txt"
        RUST_BACKTRACE=1 timeout 150 "$bin/layouts" --nocapture on_wgpu >"$out/layouts-wgpu.txt" 2>&1
        echo "wgpu layouts test: exit $?"; grep -m1 -A40 panicked "$out/layouts-wgpu.txt"; grep -E "^test " "$out/layouts-wgpu.txt"
    fi
    ;;
*)
    echo "usage: $0 bench|train|dsv3bwd|kernels|stages OUT" >&2
    exit 2
    ;;
esac
