#!/usr/bin/env bash
# Exact resume, end to end through `latentvae train`: a tiny-preset run at 64 px (40 steps, a checkpoint
# every 10), resumed from its step-20 checkpoint in a fresh folder, compared with the uninterrupted run at
# steps 30 and 40 (max abs difference per file; 0.0 = bit-identical), fp32 and `auto`, GAN off and on.
#   bash benchmarks/resume_exact.sh [WORKDIR] | tee benchmarks/results/resume-exact-DATE-CPU.txt
set -e
cd "$(dirname "$0")/.."; source .venv/bin/activate
python -c "import torch; print(\"torch\", torch.__version__, \"cpu capability\", torch.backends.cpu.get_cpu_capability(), \"oneDNN bf16\", torch.ops.mkldnn._is_mkldnn_bf16_supported())"
R=${1:-/tmp/latentvae-resume-check}; rm -rf $R; mkdir -p $R
mkdir -p $R/img; cp ../shared/data/dev-images/skimage_* $R/img/
for mp in no auto; do
for gan in false true; do
S="model.preset=tiny data.source=$R/img data.resolution=64 train.batch_size=2 train.steps=40 train.save_every=10 train.keep_last=10 loss.lpips_weight=0 loss.gan=$gan loss.gan_start=5 train.mixed_precision=$mp train.eval_every=0"
SETS=""; for x in $S; do SETS="$SETS --set $x"; done
python -m latentvae train --out $R/a-$mp-$gan $SETS --no-progress > $R/a-$mp-$gan.log 2>&1
mkdir -p $R/b-$mp-$gan/checkpoints; cp -r $R/a-$mp-$gan/checkpoints/checkpoint-00000020 $R/b-$mp-$gan/checkpoints/
python -m latentvae train --out $R/b-$mp-$gan $SETS --resume latest --no-progress > $R/b-$mp-$gan.log 2>&1
python - $R/a-$mp-$gan $R/b-$mp-$gan $mp $gan <<'PY'
import sys
from latentvae import runs
a, b = sys.argv[1], sys.argv[2]
for step in (30, 40):
    worst = {}
    for f in ("model", "ema", "disc", "optim-g", "optim-d"):
        pa = runs.final_dir(a, step) / f"{f}.safetensors"
        if not pa.exists(): continue
        ta, tb = runs.load_tensors(pa), runs.load_tensors(runs.final_dir(b, step) / f"{f}.safetensors")
        worst[f] = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    print(f"mixed_precision={sys.argv[3]} gan={sys.argv[4]} step {step}: max abs difference resumed vs uninterrupted", worst)
PY
grep -m1 "precision" $R/a-$mp-$gan.log
done; done
