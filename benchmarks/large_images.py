"""Bicubic upscales of one dev image to 2048² and 4096², for the tiled-memory benchmarks.

    python benchmarks/large_images.py SRC WORK      # writes WORK/img2048/image2048.png, WORK/img4096/image4096.png
"""
import sys
from pathlib import Path

from PIL import Image

src, work = sys.argv[1], Path(sys.argv[2])
im = Image.open(src).convert("RGB")
for side in (2048, 4096):
    (work / f"img{side}").mkdir(parents=True, exist_ok=True)
    out = work / f"img{side}" / f"image{side}.png"
    if not out.exists():
        im.resize((side, side), Image.BICUBIC).save(out)
