#!/usr/bin/env bash
# The runs behind docs/results.md: CIFAR-10 ResNets on the JPEG CIFAR-10 test set (../shared/data), all 15
# corruptions at severity 5, every registered method, under the reset, continual and label-correlated protocols;
# and the long continual stream (mode `long`): ResNet-20, eta and rdumb, the 15 corruptions repeated 10 times as one
# chain (7,500 updates at batch 200 on 10,000 images), to check that rdumb (a reset every 1000 updates) does not
# degrade over a long stream where eta does (results.md: "error per round").
# Usage: benchmarks/results_cifar10.sh [MODELS] [N_IMAGES] [THREADS] [PROTOCOLS] [METHODS]
#        benchmarks/results_cifar10.sh long [N_IMAGES] [THREADS] [ROUNDS]
#   e.g.  benchmarks/results_cifar10.sh "resnet20 resnet56" 10000 2
#         benchmarks/results_cifar10.sh resnet56 2000 1 "reset continual"   (two of these in parallel on 2 cores)
#         benchmarks/results_cifar10.sh resnet20 2000 1 continual source,norm,tent
#         benchmarks/results_cifar10.sh long 10000 2
# METHODS: comma-separated, default all (every registered method: `.venv/bin/tta methods` lists them). memo adapts
# on each test image alone, with 64 augmentations: it runs on its own stream of the same data and seed, batch 1 and
# 1000 images per corruption (at most N_IMAGES).
# Resumable: rerunning continues where an interrupted run stopped (outputs in results/cifar10/, tracked: commit a
# long run's results.jsonl as it grows; checkpoints/ and cached source statistics are ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/cifar10/cifar10-jpeg.zip
WEIGHTS=../shared/data/models/akamaster-resnet-cifar10
OUT=results/cifar10

corruption() {  # corruption MODEL N THREADS OUT_NAME ARGS...: one resumable `tta corruption` run
    local model=$1 n=$2 threads=$3 name=$4
    shift 4
    .venv/bin/tta corruption --model "cifar10_$model" --weights "$(ls "$WEIGHTS"/"$model"-*.th)" --data "$DATA" \
        --corruptions all --severity 5 --batch-size 200 --n-images "$n" --seed 0 --threads "$threads" \
        --no-progress --out "$OUT/$name" "$@"
}

if [ "${1:-}" = long ]; then
    N=${2:-10000}
    THREADS=${3:-2}
    ROUNDS=${4:-10}
    corruption resnet20 "$N" "$THREADS" "resnet20-n$N-continual-rounds$ROUNDS" \
        --methods eta,rdumb --protocol continual --rounds "$ROUNDS"
    exit 0
fi

MODELS=${1:-"resnet20 resnet56"}
N=${2:-10000}
THREADS=${3:-2}
PROTOCOLS=${4:-"reset continual correlated"}
METHODS=${5:-all}
method_args=()
if [ "$METHODS" != all ]; then
    method_args+=(--methods "$METHODS")
fi
if [ "$METHODS" = all ] || [[ ",$METHODS," == *,memo,* ]]; then
    method_args+=(--method-batch-size memo=1 --method-n-images "memo=$((N < 1000 ? N : 1000))")
fi
for model in $MODELS; do
    for protocol in $PROTOCOLS; do
        corruption "$model" "$N" "$THREADS" "$model-n$N-$protocol" --protocol "$protocol" "${method_args[@]}"
    done
done
