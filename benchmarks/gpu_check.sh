#!/usr/bin/env bash
# The GPU checks and both benchmarks in about 9 minutes (fits one 600 s device call); output in benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with the environment active
#
# Needs: a CUDA build of torch; the LPIPS backbones ($LATENTVAE_LPIPS_DIR, default ../shared/weights/lpips);
# images for encoding ($DEV_IMAGES, default ../shared/data/dev-images, else the 4 photos in data/samples/train).
# What it measures (issue 16, benchmarks/RESULTS.md "Still to be measured"): encoding at 512x512 against
# the measured bf16 matmul and conv peaks, pure bf16 weights against bf16 autocast, torch.compile
# both ways with its compile time and break-even; the training step (sd preset, 256x256) against the same,
# with torch.compile of the VAE and of LPIPS; the AdamW implementations; no host sync inside an accumulation
# window (tests/test_gpu.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export LATENTVAE_LPIPS_DIR="${LATENTVAE_LPIPS_DIR:-../shared/weights/lpips}"
IMAGES="${DEV_IMAGES:-../shared/data/dev-images}"
[ -d "$IMAGES" ] || IMAGES=data/samples/train
GPU=$(python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
STAMP="$(date +%Y%m%d)-${GPU}"
OUT=benchmarks/results
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu-$STAMP-nvidia-smi.txt" 2>&1

# correctness first (seconds): no host sync inside a gradient-accumulation window
timeout 60 python -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests-$STAMP.txt"
timeout 30 python benchmarks/optimizer_step.py --out "$OUT/optimizer-$STAMP-sd.txt"

# encoding: 128 images (the dev images repeated) at 512x512, the naive loop at batch 32, latentvae at its
# default (--batch-size 0: 16 at 512x512 on a GPU); each row twice, ABBA
timeout 220 python benchmarks/encode_speed.py --resolution 512 --batch-size 32 --images 16 --repeat 8 --rounds 2 \
    --images-dir "$IMAGES" --rows naive,latentvae,latentvae+autocast,latentvae+compile \
    --out "$OUT/encode-$STAMP-sd512.json" 2>&1 | tee "$OUT/encode-$STAMP-sd512.txt"

# training: the default step (auto on CUDA: bf16 autocast, channels_last, fused AdamW), GAN off and on; + compile
# of the VAE, + compile of LPIPS
timeout 240 python benchmarks/train_throughput.py --preset sd --resolution 256 --batch 8 --steps 10 --warmup 3 \
    --rows naive,latentvae,naive-gan,latentvae-gan,latentvae+compile,latentvae+compile-lpips \
    --out "$OUT/train-$STAMP-sd256.json" 2>&1 | tee "$OUT/train-$STAMP-sd256.txt"
