#!/usr/bin/env bash
# docs/performance.md's GPU measurements on a machine without cargo (a lent H200): one script,
# one phase per table, parametrised by environment variables. With cargo and a GPU, run the
# `cargo xtask bench ...` command each phase names instead.
#
# Here (with cargo), once:
#   cargo build --release -p moe-benches --features cuda --bin moe-gpu-bench   # cuda,wgpu for `wgpu`
#   cargo build --release -p moe-runner --features cuda
#   cargo build --release -p xtask
#   cargo test --release -p moe-kernels --features cuda --test cube_kernels --test layouts --no-run  # cuda,wgpu: wgpu tests too
# and copy into .gpu-bin/ (ignored through .git/info/exclude): moe-gpu-bench, moe-runner, xtask,
# ../shared/tools/torch_moe_bench.py, ../shared/tools/torch_train_bench.py, and for `kernels` the
# two test binaries (target/release/deps/cube_kernels-*, layouts-*) as cube_kernels and layouts.
# Binaries may be gzipped to fit a carry limit (`gzip -9`); the script unpacks *.gz first. Carry
# .gpu-bin/ (and .gl/, the Vulkan loader debs, for `wgpu` and the wgpu kernel tests).
#
# There, from the repository's root:
#   benches/gpu/run-h200.sh layer OUT    # one MoE layer beside PyTorch, small and dsv3
#                                        #   = cargo xtask bench --backend cuda --what layer
#   benches/gpu/run-h200.sh train OUT    # training `small` beside PyTorch
#                                        #   = cargo xtask bench --train --backend cuda --torch-modes bf16
#   benches/gpu/run-h200.sh profile OUT  # where a training step's time goes (moe-runner --profile)
#   benches/gpu/run-h200.sh kernels OUT  # the kernel tests on CUDA (and on NVIDIA's Vulkan with .gl/)
#   benches/gpu/run-h200.sh wgpu OUT     # the small layer in f32 on burn-wgpu
#                                        #   = cargo xtask bench --backend wgpu --shapes small --tokens 8192 --what layer --skip-torch
#   benches/gpu/run-h200.sh gemm OUT     # the grouped GEMM alone (no PyTorch column)
#   benches/gpu/run-h200.sh stages OUT   # the layer forward's pieces, each timed alone
#
# Parameters (defaults in brackets):
#   GPU_BIN [.gpu-bin]  where the binaries are
#   layer:   SHAPES [small dsv3]  TOKENS [4096,8192,16384]  MODES [fwd,fwdbwd]  WHAT [layer]
#            TIMEOUT [200] s per child run, TORCH_TIMEOUT [300] s; CUBECL_AUTOTUNE_LEVEL [minimal]
#            The first shape runs beside PyTorch's script, the others are appended with
#            --skip-torch (the script times every shape); the table is OUT/layer/table.md.
#   train:   STEPS [30]  PRECISIONS [bf16]  TORCH_MODES [bf16; add bf16-compile for torch.compile]
#            TIMEOUT [600]  TORCH_TIMEOUT [300]; the table is OUT/train/table.md.
#   profile: STEPS [30]; OUT/profile.txt, OUT/profile-metrics.jsonl.
#   gemm, stages: SHAPES [dsv3 small]  TOKENS [8192]; MOE_WGMMA=off, MOE_GEMM_TILE, MOE_GEMM_WARP,
#            MOE_GEMM_PIPE, MOE_FLUSH and MOE_KERNELS=portable pass through to the binaries.
#   SAVE_CACHE=1 writes cubecl's compiled kernels and autotune results to OUT/cubecl-cache.tgz
#            (target/ below the root, for moe-gpu-bench and the tests) and OUT/runner-cache.tgz
#            (moe-runner's $BURN_MOE_KERNEL_CACHE, ~/.cache/burn-moe/kernels by default); copy them
#            into GPU_BIN and the next call restores them and skips that compilation. The current
#            tables were measured without them (a cold first call costs up to minutes).
# Every child runs under a time limit, so one hang does not take the rest with it.
set -u
phase=${1:-}
out=${2:-}
[ -n "$phase" ] && [ -n "$out" ] || { echo "usage: $0 layer|train|profile|kernels|wgpu|gemm|stages OUT" >&2; exit 2; }
bin=${GPU_BIN:-.gpu-bin}
mkdir -p "$out"
for f in "$bin"/*.gz; do [ -e "$f" ] && gunzip -f "$f"; done
chmod +x "$bin"/* 2>/dev/null

runner_cache=${BURN_MOE_KERNEL_CACHE:-$HOME/.cache/burn-moe/kernels}
if [ -f "$bin/cubecl-cache.tgz" ]; then
    mkdir -p target && tar xzf "$bin/cubecl-cache.tgz" -C target && echo "restored target/ caches"
fi
if [ -f "$bin/runner-cache.tgz" ]; then
    mkdir -p "$runner_cache" && tar xzf "$bin/runner-cache.tgz" -C "$runner_cache" && echo "restored $runner_cache"
fi
save_cache() {
    [ -n "${SAVE_CACHE:-}" ] || return 0
    [ -d target ] && tar czf "$out/cubecl-cache.tgz" --exclude=./release --exclude=./debug -C target .
    [ -d "$runner_cache" ] && tar czf "$out/runner-cache.tgz" -C "$runner_cache" .
}
trap save_cache EXIT

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# NVIDIA's Vulkan for wgpu: the loader comes from .gl/ (false without it).
vulkan_loader() {
    [ -d .gl ] || return 1
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
        export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    fi
}

case $phase in
layer)
    export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
    first=1
    for shape in ${SHAPES:-small dsv3}; do
        extra=(--torch-timeout "${TORCH_TIMEOUT:-300}")
        [ $first = 1 ] || extra=(--skip-torch --append)
        "$bin/xtask" bench --backend cuda --prebuilt "$bin" --shapes "$shape" --modes "${MODES:-fwd,fwdbwd}" \
            --tokens "${TOKENS:-4096,8192,16384}" --what "${WHAT:-layer}" --timeout "${TIMEOUT:-200}" \
            --out "$out/layer" "${extra[@]}"
        first=0
    done
    ;;
train)
    "$bin/xtask" bench --train --backend cuda --prebuilt "$bin" --train-steps "${STEPS:-30}" \
        --precisions "${PRECISIONS:-bf16}" --torch-modes "${TORCH_MODES:-bf16}" \
        --timeout "${TIMEOUT:-600}" --torch-timeout "${TORCH_TIMEOUT:-300}" --out "$out/train"
    ;;
profile)
    rm -rf /tmp/run-profile
    timeout "${TIMEOUT:-600}" "$bin/moe-runner" train --backend cuda --config configs/small.toml \
        --run-dir /tmp/run-profile --profile --set train.steps="${STEPS:-30}" --set train.eval_every=0 \
        --set train.eval_batches=2 --set train.checkpoint_every=0 2>&1 | tee "$out/profile.txt"
    cp /tmp/run-profile/metrics.jsonl "$out/profile-metrics.jsonl" 2>/dev/null
    ;;
kernels)
    RUST_BACKTRACE=1 timeout "${TIMEOUT:-300}" "$bin/cube_kernels" --nocapture --test-threads 1 on_cuda >"$out/kernels-cuda.txt" 2>&1
    echo "cuda kernel tests: exit $?"; grep -E "^test |test result" "$out/kernels-cuda.txt"
    RUST_BACKTRACE=1 timeout "${TIMEOUT:-300}" "$bin/layouts" --nocapture --test-threads 1 on_cuda >"$out/layouts-cuda.txt" 2>&1
    echo "cuda layouts test: exit $?"; grep -E "^test |test result" "$out/layouts-cuda.txt"
    if vulkan_loader; then
        RUST_BACKTRACE=1 timeout "${TIMEOUT:-300}" "$bin/cube_kernels" --nocapture --test-threads 1 on_wgpu >"$out/kernels-wgpu.txt" 2>&1
        echo "wgpu kernel tests: exit $?"; grep -m1 -A40 panicked "$out/kernels-wgpu.txt"; grep -E "^test |test result" "$out/kernels-wgpu.txt"
    fi
    ;;
wgpu)
    vulkan_loader || { echo "no .gl/: the Vulkan loader is missing" >&2; exit 1; }
    RUST_BACKTRACE=1 "$bin/xtask" bench --backend wgpu --prebuilt "$bin" --shapes small --modes "${MODES:-fwd,fwdbwd}" \
        --tokens "${TOKENS:-8192}" --what layer --skip-torch --timeout "${TIMEOUT:-300}" --out "$out/wgpu"
    ;;
gemm | stages)
    what=gemm,gemm_wgrad,gemm_down reps=(--warmup 2 --reps 5)
    [ "$phase" = stages ] && what=layer,router,stages
    for shape in ${SHAPES:-dsv3 small}; do
        timeout "${TIMEOUT:-200}" "$bin/moe-gpu-bench" --backend cuda --shape "$shape" --mode fwd \
            --tokens "${TOKENS:-8192}" --what "$what" "${reps[@]}" --out "$out/$phase-$shape.jsonl"
    done
    ;;
*)
    echo "usage: $0 layer|train|profile|kernels|wgpu|gemm|stages OUT" >&2
    exit 2
    ;;
esac
