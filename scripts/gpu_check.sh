#!/usr/bin/env bash
# The GPU check, for a lent GPU machine: one call, about 5 minutes, no network, no installs but
# the wheels carried along in .whl/ (webdataset, braceexpand, hydra-core, omegaconf, antlr4;
# the machine's image has torch, torchvision, lightning, timm, torchmetrics, fsspec, pillow,
# scikit-learn). Run from the repository root:
#
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh
#
# It measures, writing a log and JSON under $OUT:
#   1. ResNet-50, bf16, channels_last, 224 px, batch 256: training images/s through our
#      Lightning module fed from our shards, vs a plain loop on the same loader, vs the same
#      module fed one batch already on the GPU (scripts/bench_train.py);
#   2. GPU JPEG decode (torchvision.io.decode_jpeg on cuda) vs our CPU decode per core
#      (scripts/gpu_decode.py);
#   3. our loader against the decode limit on this machine's cores (scripts/bench_loader.py);
#   4. the shipped inspection_resnet50 experiment through `python -m train`, for 40 steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

site=/tmp/site
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
# Our own packages, as a wheel (conf/ installs as train.conf, which Hydra looks for).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . || exit 1
export PYTHONPATH="$site"
cd /tmp  # import the installed copy, not the checkout

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, lightning, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'cores', __import__('os').cpu_count())"
repo=$OLDPWD
cores=$(nproc)

step() { echo; echo "=== $1 ($(date +%T))"; }

step "benchmark set: 5,000 ImageNet-like JPEGs"
python3 "$repo/scripts/bench_data.py" --variant large --images 5000 --root /tmp/bench || exit 1
index=$(ls /tmp/bench/large-*/shards/dataset.json)

# Training reads the set 10 times over (the same shards listed 10 times), so that the timed
# steps measure the steady state rather than 5,000-image epochs that restart the workers.
index10=$(python3 -c "import sys; sys.path.insert(0, '$repo/scripts'); from bench_data import repeat_index; print(repeat_index('$index', 10))")
step "training: ResNet-50 bf16 channels_last, ours vs plain vs GPU-resident batches"
timeout 200 python3 "$repo/scripts/bench_train.py" --index "$index10" --device cuda --precision bf16-mixed \
    --channels-last --backbone resnet50 --image-size 224 --batch 256 --workers $((cores - 1)) \
    --warmup 10 --steps 60 --rounds 1 --pin-memory --json "$OUT/train.json"

step "the shipped experiment, end to end: python -m train +experiment=inspection_resnet50 (40 steps)"
timeout 150 python3 -m train +experiment=inspection_resnet50 data.index="$index" data.val_split=train \
    data.num_workers=$((cores - 1)) trainer.max_steps=40 trainer.limit_val_batches=4 logger=csv \
    hydra.run.dir=/tmp/run && tail -n 3 /tmp/run/csv/*/metrics.csv

step "GPU JPEG decode vs CPU decode per core"
timeout 120 python3 "$repo/scripts/gpu_decode.py" --index "$index" --images 2048 --json "$OUT/decode.json"

step "loader vs the decode limit on $cores cores"
# Batches of 64: with 16 workers, a warm-up of one 256-image batch each would leave too little
# of the 5,000 images to time.
timeout 180 python3 "$repo/scripts/bench_loader.py" --only L0,L3 --workers "$cores" --batch-size 64 \
    --root /tmp/bench --json "$OUT/loader.json"

step "done"
