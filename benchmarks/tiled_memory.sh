#!/bin/bash
# Peak memory of `latentvae evaluate` on one large image, tiled and untiled (issues 14 and 16).
#
#   bash benchmarks/tiled_memory.sh [VAE] [WORK]      # default: taesd:sd, /tmp/tiled-memory
#
# Makes 2048^2 and 4096^2 bicubic upscales of ../shared/data/dev-images/kde_Path.jpg, then runs
# `latentvae evaluate --lpips none` on each under /usr/bin/time -v: tiled at both sizes, untiled at
# 2048^2 only (untiled 4096^2 needs several GB per activation). Prints peak RSS of the whole
# process (imports and the metrics' full-size image copies included), wall time and PSNR.
set -euo pipefail
VAE=${1:-taesd:sd}
WORK=${2:-/tmp/tiled-memory}
HERE=$(cd "$(dirname "$0")/.." && pwd)
SRC=${DEV_IMAGE:-$HERE/../shared/data/dev-images/kde_Path.jpg}
python "$HERE/benchmarks/large_images.py" "$SRC" "$WORK"
python -c "import torch; print('cpu capability:', torch.backends.cpu.get_cpu_capability())"
for run in "2048 --tiling" "2048 " "4096 --tiling"; do
  set -- $run
  side=$1; tiling=${2:-}
  name=$side${tiling:+-tiled}
  rm -rf "$WORK/report-$name"
  /usr/bin/time -v latentvae evaluate --vae "$VAE" --data "$WORK/img$side" --lpips none \
      --out "$WORK/report-$name" $tiling > "$WORK/$name.log" 2>&1
  rss=$(grep 'Maximum resident' "$WORK/$name.log" | awk '{print $6}')
  wall=$(grep 'Elapsed' "$WORK/$name.log" | awk '{print $8}')
  psnr=$(python -c "import json,sys; d=json.load(open(sys.argv[1])); print(round(next(iter(d['vaes'].values()))['psnr'], 2))" \
         "$WORK/report-$name/summary.json")
  echo "$VAE ${side}x${side} ${tiling:-untiled}: peak RSS $((rss / 1024)) MiB, wall $wall, PSNR $psnr dB"
done
