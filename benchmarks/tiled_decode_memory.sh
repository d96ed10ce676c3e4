#!/bin/bash
# Peak memory of `latentvae decode` (a cache's latents back to pixels) on large images, tiled and untiled
# (issue 16: decode in bounded memory).
#
#   bash benchmarks/tiled_decode_memory.sh [VAE] [WORK]      # default: taesd:sd, /tmp/tiled-decode-memory
#
# Makes 2048^2 and 4096^2 bicubic upscales of ../shared/data/dev-images/kde_Path.jpg, encodes each into a
# one-row cache at its own size (`latentvae encode --resolution SIDE`, fp32, decoding in the main process;
# encode itself is not tiled, so this setup step needs the whole image's activations), then times
# `latentvae decode CACHE --limit 1` under /usr/bin/time -v: tiled at both sizes, untiled at 2048^2 only.
# Prints the peak RSS of the decode process (imports, the source image and the PSNR's copies included),
# wall time and PSNR against the source.
set -euo pipefail
VAE=${1:-taesd:sd}
WORK=${2:-/tmp/tiled-decode-memory}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC=${DEV_IMAGE:-$HERE/../shared/data/dev-images/kde_Path.jpg}
python "$HERE/benchmarks/large_images.py" "$SRC" "$WORK"
python -c "import torch; print('cpu capability:', torch.backends.cpu.get_cpu_capability())"
for side in 2048 4096; do
  if [ ! -f "$WORK/cache$side/manifest.json" ]; then
    /usr/bin/time -v latentvae encode --vae "$VAE" --data "$WORK/img$side" --out "$WORK/cache$side" \
        --resolution "$side" --mixed-precision no --num-workers 0 --no-progress > "$WORK/encode$side.log" 2>&1
    rss=$(grep 'Maximum resident' "$WORK/encode$side.log" | awk '{print $6}')
    echo "$VAE ${side}x${side} encode (setup, untiled): peak RSS $((rss / 1024)) MiB"
  fi
done
for run in "2048 --tiling" "2048 " "4096 --tiling"; do
  set -- $run
  side=$1; tiling=${2:-}
  name=decode$side${tiling:+-tiled}
  /usr/bin/time -v latentvae decode "$WORK/cache$side" --limit 1 $tiling > "$WORK/$name.log" 2>&1
  rss=$(grep 'Maximum resident' "$WORK/$name.log" | awk '{print $6}')
  wall=$(grep 'Elapsed' "$WORK/$name.log" | awk '{print $8}')
  psnr=$(grep 'mean PSNR' "$WORK/$name.log" | awk '{print $3}')
  echo "$VAE ${side}x${side} decode ${tiling:-untiled}: peak RSS $((rss / 1024)) MiB, wall $wall, PSNR $psnr dB"
done
