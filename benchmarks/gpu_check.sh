#!/usr/bin/env bash
# The GPU check: one prepared script, about 4-6 minutes on one GPU, writing everything into the folder given.
#   python benchmarks/gpu_data.py --out .gpu_data          # here, once: a small data subset that can travel
#   bash benchmarks/gpu_check.sh OUT_DIR [DATA_DIR]        # on the GPU machine, from the repository root
# 1. the CUDA tests (tests/test_cuda.py, the corruption generator's CUDA tests, pinned memory);
# 2. tta bench on a randomly initialised torchvision ResNet-50 at 224 px, batch 64, every method, fp32 and bf16 AMP;
# 3. tta corruption on ResNet-56 (real weights) over the 15 corruptions at severity 5 on the data subset, every
#    method, reset protocol, batch 200, with the corruption generator on the GPU;
# 4. tta bench as in 2 with bf16 and channels_last, with fp16 (loss scaling) and channels_last, and (where the
#    option exists) the lean graph forced on.
# Needs only the core dependencies (torch, torchvision, numpy, tqdm, pillow; matplotlib for the plots).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [DATA_DIR]}
DATA=${2:-.gpu_data}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TTA_FROST_DIR="$DATA/frost"
mkdir -p "$OUT"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to OUT/NAME.txt, remember failures
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
    [ $rc -eq 0 ] || status=1
}

{ date -u; nvidia-smi; "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
  torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/machine.txt" 2>&1

step tests 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
    tests/test_corruptions.py tests/test_prefetch.py -k "cuda or pinned"

BENCH=("$PY" -m eval.cli bench --model torchvision:resnet50 --batch-size 64 --device cuda --methods all
       --repeats 20 --warmup 5)
step bench_r50_fp32 120 "${BENCH[@]}" --out "$OUT/bench_r50_fp32"
step bench_r50_bf16 120 "${BENCH[@]}" --amp --out "$OUT/bench_r50_bf16"
step corruption_r56 150 "$PY" -m eval.cli corruption --model cifar10_resnet56 \
    --weights "$DATA/resnet56-4bfd9763.th" --data "$DATA/cifar10-subset" --corruptions all --severity 5 \
    --protocol reset --batch-size 200 --source-images 500 --device cuda --no-progress --out "$OUT/corruption_r56"
step bench_r50_bf16_cl 120 "${BENCH[@]}" --amp --channels-last --out "$OUT/bench_r50_bf16_cl"
step bench_r50_fp16_cl 120 "${BENCH[@]}" --amp fp16 --channels-last --out "$OUT/bench_r50_fp16_cl"
if "$PY" -c "import sys, tta; sys.exit('lean_graph' not in tta.method_options('tent').__dataclass_fields__)"; then
    # the lean graph forced on, on the GPU (where the method option exists)
    step bench_r50_fp32_lean 90 "${BENCH[@]/all/tent,core,cafa}" --set tent.lean_graph=on --set core.lean_graph=on \
        --set cafa.lean_graph=on --out "$OUT/bench_r50_fp32_lean"
fi
exit $status
