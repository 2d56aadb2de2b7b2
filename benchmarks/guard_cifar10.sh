#!/usr/bin/env bash
# The collapse-guard runs behind docs/results.md: ResNet-20 on the JPEG CIFAR-10 test set (../shared/data), all 15
# corruptions at severity 5, label-correlated (Dirichlet delta 0.1), every method with and without
# `--collapse-guard` (rows '<method>+guard'), under one protocol.
# Usage: benchmarks/guard_cifar10.sh [PROTOCOL] [N_IMAGES] [THREADS]
#   e.g.  benchmarks/guard_cifar10.sh correlated-continual 2000 1
# Resumable (outputs in runs/results-guard/).
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOCOL=${1:-correlated-continual}
N=${2:-2000}
THREADS=${3:-1}
WEIGHTS=$(ls ../shared/data/models/akamaster-resnet-cifar10/resnet20-*.th)
.venv/bin/tta corruption --model cifar10_resnet20 --weights "$WEIGHTS" --data ../shared/data/cifar10/cifar10-jpeg.zip \
    --methods source,norm,alpha_bn,core,cafa,tent --collapse-guard --corruptions all --severity 5 \
    --protocol "$PROTOCOL" --batch-size 200 --n-images "$N" --seed 0 --threads "$THREADS" --no-progress \
    --out "runs/results-guard/resnet20-n$N-$PROTOCOL"
