#!/usr/bin/env bash
# Evidence for docs/continual.md: every number there comes from these commands.
# Measured on a shared 2-core CPU (torch 2.13.0 CPU build), one torch thread per run (--threads 1: with two
# threads on a loaded 2-core machine the intra-op workers spin-wait and steps get ~10x slower).
# Usage: bash benchmarks/continual_evidence.sh [adab2n|nap|nmc|all]   (outputs under runs/continual-evidence/)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/continual-evidence}
DATA=${DATA:-../shared/data/cifar10/cifar10-jpeg.zip}
WEIGHTS=${WEIGHTS:-../shared/data/models/akamaster-resnet-cifar10}
WHAT=${1:-all}
tta() { "$PY" -m eval.cli continual --threads 1 --no-progress "$@"; }

if [[ $WHAT == adab2n || $WHAT == all ]]; then
  # AdaB2N vs BN inside the same joint-forward ER-ACE, Split CIFAR-10 (JPEG zip) online: reduced ResNet-18
  # (nf 20), batch 10 + 10 replayed, one pass, SGD lr 0.03, buffer 500; class-balanced subset of 2500 training
  # images (500 per task) and 1000 test images, seeds 0,1,2 (same subsets and initialisations for both norms).
  # Then the same with plain ER (cross-entropy on the joint batch).
  for method in er_ace er; do
    for norm in bn adab2n; do
      tta --benchmark split-cifar10 --data "$DATA" --method "$method" --norm "$norm" --buffer 500 --batch-size 10 \
          --epochs 1 --n-train 2500 --n-test 1000 --seeds 0,1,2 --out "$OUT/cifar10-$method-$norm"
    done
  done
fi

if [[ $WHAT == nap || $WHAT == all ]]; then
  # Plasticity on re-randomised labels: the same 512 digits (16x16 RGB) relabelled at random (10 classes) in each
  # of 15 tasks; MLP 768-256-256-10, Adam lr 1e-3, batch 32, 20 epochs per task; the accuracy is the
  # memorisation of each task's labels. Constant learning rate for the three-way comparison, then LayerNorm and
  # NaP again with an explicit cosine schedule restarted at every task.
  for norm in none layer nap; do
    tta --benchmark random-labels --method sgd --norm "$norm" --tasks 15 --optimizer adam --lr 0.001 \
        --seeds 0,1,2 --out "$OUT/random-labels-$norm"
  done
  for norm in layer nap; do
    tta --benchmark random-labels --method sgd --norm "$norm" --tasks 15 --optimizer adam --lr 0.001 \
        --lr-schedule cosine-per-task --seeds 0,1,2 --out "$OUT/random-labels-$norm-cosine-per-task"
  done
  # The same three at a lower constant learning rate (Adam 3e-4).
  for norm in nap layer none; do
    tta --benchmark random-labels --method sgd --norm "$norm" --tasks 15 --optimizer adam --lr 0.0003 \
        --seeds 0,1,2 --out "$OUT/random-labels-$norm-lr3e-4"
  done
fi

if [[ $WHAT == nmc || $WHAT == all ]]; then
  # NMC on the frozen pretrained CIFAR-10 ResNet-56 (akamaster), Split CIFAR-10 (JPEG zip), one pass, class-balanced
  # subsets of 10000 training and 2000 test images (the ResNet-56 forward is the whole cost: ~20000 images per run
  # with one thread); Euclidean distance on L2-normalised features, raw means and renormalised means.
  for renorm in "" --nmc-renormalize; do
    tta --benchmark split-cifar10 --data "$DATA" --method nmc --backbone cifar10_resnet56 \
        --weights "$WEIGHTS/resnet56-4bfd9763.th" --n-train 10000 --n-test 2000 $renorm \
        --out "$OUT/cifar10-nmc-resnet56${renorm:+-renorm}"
  done
fi

"$PY" benchmarks/continual_collate.py "$OUT"
