#!/usr/bin/env bash
# The published architectures of every new family (diffusers' default configs; HunyuanImage 2.1's given),
# with random weights, through evaluate, encode and a decoder-only fine-tune + export: that nothing breaks at
# real size, and the time and peak memory each takes. Quality figures are meaningless (random weights).
#   bash benchmarks/real_size_families.sh [WORK]        # default WORK=/tmp/real; ~6 min on 2 CPU cores
set -euo pipefail
W="${1:-/tmp/real}"
mkdir -p "$W/imgs"
cp ../shared/data/dev-images/kde_BytheWater.jpg ../shared/data/dev-images/kde_ColdRipple.jpg "$W/imgs/"
python - "$W" <<'PY'
import sys, time, torch, diffusers
from pathlib import Path
out = Path(sys.argv[1]); torch.manual_seed(0)
make = {"flux2": lambda: diffusers.AutoencoderKLFlux2(), "qwenimage": lambda: diffusers.AutoencoderKLQwenImage(),
        "wan": lambda: diffusers.AutoencoderKLWan(), "dc": lambda: diffusers.AutoencoderDC(),
        "hunyuanimage": lambda: diffusers.AutoencoderKLHunyuanImage(
            in_channels=3, out_channels=3, latent_channels=64, block_out_channels=(128, 256, 512, 512, 1024, 1024),
            layers_per_block=2, spatial_compression_ratio=32, sample_size=384, scaling_factor=0.75289)}
for name, f in make.items():
    v = f(); v.save_pretrained(out / name)
    print(name, f"{sum(p.numel() for p in v.parameters()) / 1e6:.1f}M parameters")
print("cpu capability:", torch.backends.cpu.get_cpu_capability(), "| oneDNN bf16:", torch.ops.mkldnn._is_mkldnn_bf16_supported())
PY
rm -rf "$W/report" "$W"/cache-* "$W/run-flux2" "$W/export-flux2"
T='%e s wall, %M KB peak'
/usr/bin/time -f "evaluate, all families, fp32: $T" latentvae evaluate --vae "$W/flux2" --vae "$W/qwenimage" \
    --vae "$W/wan" --vae "$W/dc" --vae "$W/hunyuanimage" --vae taesd:flux --data "$W/imgs" --max-side 256 \
    --out "$W/report" --mixed-precision no
for n in qwenimage flux2; do
  /usr/bin/time -f "encode $n at 256 px (weights auto): $T" latentvae encode --vae "$W/$n" --data "$W/imgs" \
      --out "$W/cache-$n" --resolution 256 --no-progress
done
python -c "
from latentvae import LatentDataset, LatentLoader
for n in ('qwenimage', 'flux2'):
    b = next(iter(LatentLoader(LatentDataset('$W/cache-' + n), batch_size=2, seed=0)))
    print(n, 'LatentLoader batch', tuple(b['latents'].shape))"
/usr/bin/time -f "decoder-only FLUX.2 fine-tune, 2 steps at 64 px: $T" latentvae train --out "$W/run-flux2" \
    --no-progress --set model.init_from="$W/flux2" --set model.train_decoder_only=true --set data.source="$W/imgs" \
    --set data.resolution=64 --set data.val_count=0 --set train.steps=2 --set train.batch_size=1 \
    --set train.save_every=2 --set train.eval_every=0
latentvae export "$W/run-flux2" --out "$W/export-flux2"
python -c "
import torch; from diffusers import AutoencoderKLFlux2
a, b = AutoencoderKLFlux2.from_pretrained('$W/export-flux2'), AutoencoderKLFlux2.from_pretrained('$W/flux2')
print('BatchNorm statistics kept:', torch.equal(a.bn.running_mean, b.bn.running_mean) and torch.equal(a.bn.running_var, b.bn.running_var),
      '| encoder unchanged:', all(torch.equal(x, y) for x, y in zip(a.encoder.parameters(), b.encoder.parameters())))"
