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
    "$bin/xtask" bench --backend cuda --prebuilt "$bin" --shapes small --out "$out/bench" \
        --timeout 110 --torch-timeout 170
    "$bin/xtask" bench --backend cuda --prebuilt "$bin" --shapes dsv3 --modes fwd --skip-torch --append \
        --out "$out/bench" --timeout 170
    ;;
train)
    steps=${STEPS:-40}
    for arm in moe dense; do
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
dsv3bwd)
    "$bin/xtask" bench --backend cuda --prebuilt "$bin" --shapes dsv3 --modes fwdbwd --skip-torch \
        --out "$out/bench" --timeout "${DSV3_BWD_TIMEOUT:-200}"
    ;;
*)
    echo "usage: $0 bench|train|dsv3bwd OUT" >&2
    exit 2
    ;;
esac
