#!/usr/bin/env bash
# The runs behind docs/results.md: CIFAR-10 ResNets on the JPEG CIFAR-10 test set (../shared/data), all 15
# corruptions at severity 5, every method, under the reset, continual and label-correlated protocols.
# Usage: benchmarks/results_cifar10.sh [MODELS] [N_IMAGES] [THREADS] [PROTOCOLS]
#   e.g.  benchmarks/results_cifar10.sh "resnet20 resnet56" 10000 2
#         benchmarks/results_cifar10.sh resnet56 2000 1 "reset continual"   (two of these in parallel on 2 cores)
# Resumable: rerunning continues where an interrupted run stopped (outputs in runs/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${1:-"resnet20 resnet56"}
N=${2:-10000}
THREADS=${3:-2}
PROTOCOLS=${4:-"reset continual correlated"}
DATA=../shared/data/cifar10/cifar10-jpeg.zip
WEIGHTS=../shared/data/models/akamaster-resnet-cifar10
for model in $MODELS; do
    weights=$(ls "$WEIGHTS"/"$model"-*.th)
    for protocol in $PROTOCOLS; do
        .venv/bin/tta corruption --model "cifar10_$model" --weights "$weights" --data "$DATA" \
            --methods source,norm,alpha_bn,core,cafa,tent --corruptions all --severity 5 \
            --protocol "$protocol" --batch-size 200 --n-images "$N" --seed 0 --threads "$THREADS" \
            --no-progress --out "runs/results/$model-n$N-$protocol"
    done
done
