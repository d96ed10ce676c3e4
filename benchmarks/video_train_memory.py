"""Peak memory of one decoder-only training step on clips, for the memory knobs of docs/video.md.

    python benchmarks/video_train_memory.py FAMILY FRAMES SIZE [section.key=value ...]   # from the repository root
    python benchmarks/video_train_memory.py wan 17 128 data.latent_tile=4

FAMILY is wan (Wan 2.1's layout at a third of its width) or cogvideox (CogVideoX's at a quarter), random weights;
two moving-shapes videos of FRAMES frames at SIZE x SIZE are written once under $TMPDIR; one step of fp32, batch 1,
LPIPS off unless set, is run after the trainer is built. Prints one JSON line: the resident memory before the step,
the process's peak (ru_maxrss) and their difference (the step's), in MB. One process per figure.
"""
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch
from conftest import fresh_trainer, tiny_overrides
from families import save_folder
from videos import moving_shapes
from latentvae.config import load_config
from latentvae.train.step import train_step
import diffusers

name, frames, size, *sets = sys.argv[1:]
frames, size = int(frames), int(size)
root = Path(os.environ.get('TMPDIR', tempfile.gettempdir())) / f'latentvae-video-train-memory-{name}-{frames}-{size}'
if not root.exists():
    (root / 'v').mkdir(parents=True)
    for i in range(2):
        moving_shapes(root / 'v' / f'{i}.mp4', frames, size=(size, size), fps=8, seed=i)
    torch.manual_seed(0)
    if name == 'wan':  # Wan 2.1's layout at a third of its width (base_dim 96, num_res_blocks 2)
        vae = diffusers.AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                         temperal_downsample=[False, True, True])
    else:  # CogVideoX's layout at a quarter of its width (128, 256, 256, 512)
        vae = diffusers.AutoencoderKLCogVideoX(block_out_channels=(32, 64, 64, 128), latent_channels=16,
                                               layers_per_block=1, norm_num_groups=32, temporal_compression_ratio=4)
    save_folder(vae, root / 'vae')
cfg = load_config(None, tiny_overrides(root / 'v', **{
    "model.init_from": str(root / 'vae'), "model.train_decoder_only": "true", "data.frames": str(frames),
    "data.frame_size": f"{size}x{size}", "data.val_count": "1", "train.batch_size": "1", "train.mixed_precision": "no",
    "loss.lpips_weight": "0", "train.eval_every": "0", "train.ema_decay": "0", "train.cpu_threads": "2",
    "train.channels_last": "false", **dict(s.split('=', 1) for s in sets)}))
tr = fresh_trainer(cfg, root / 'run')
x = tr.stream[0]['pixels'][None]
def rss_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
before = rss_mb()
t0 = time.time()
logs = train_step(tr.parts, tr.state, x)
dt = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"family": name, "frames": frames, "size": size, "sets": sets, "rss_before_mb": round(before),
                  "peak_rss_mb": round(peak), "step_mb": round(peak - before), "step_s": round(dt, 1),
                  "rec": round(float(logs["rec"]), 4)}))
