"""Export any VAE of any family to a diffusers folder (or, for AutoencoderKL, one LDM-layout .safetensors
file), with its pipeline's latent statistics measured on your images and a model card.

    latentvae export runs/quickstart --out out/my-vae --calibrate data/samples/train
    latentvae export runs/quickstart/checkpoints/checkpoint-00000300 --out out/my-vae --weights raw --dtype fp16
    latentvae export path/to/flux2-vae --out out/vae --calibrate IMAGES      # any folder, pipeline, hub id, file
    latentvae export runs/quickstart --out out/my-vae.safetensors --format single-file --calibrate IMAGES

    from latentvae.export import ExportOptions, export
    result = export(ExportOptions(src="runs/quickstart", out="out/my-vae", calibrate="data/samples/train"))

SRC is anything `vae.loading.load_vae` reads (a training run or checkpoint, a diffusers or pipeline
folder of any family, an LDM/SD file, a hub id, `taesd:*`, with its `[key=value]` options), opened as
one LoadedVae: its family (vae/families.py) decides everything that differs between classes. OUT
gets `config.json` + `diffusion_pytorch_model.safetensors` (`type(vae).from_pretrained(OUT)`), a
model card `README.md` and `latentvae_export.json` (the same facts, machine-readable). With
`--calibrate`, the family's pipeline formula (vae/conventions.py, citing the diffusers lines) gets
the entries that make its latents zero-mean, unit-variance on those images, written where that
pipeline reads them (config.json, or flux2's BatchNorm buffers); without it, another VAE keeps its
own factors and a run gets the documented placeholder. The folder is staged beside OUT, reloaded
with the class's own `from_pretrained` and compared with the source, and only then renamed into
place (fsutil.staged_folder); a failed or interrupted export leaves nothing behind. See docs/export.md.

The package, by concept:

    source.py       SRC opened as a LoadedVae (plus a run's state), OUT checked against it
    calibrate.py    latent statistics of what the family's consumers take, latent health, the fp16 check
    factors.py      what is written for the factors, and where: measured, kept, or the placeholder
    verify.py       the reload with the class's own from_pretrained, compared with the source
    single_file.py  --format single-file: the LDM layout, checked with diffusers' own converter
    evaluation.py   the exported weights' own entry of an evaluation summary
    card.py         the model card, made from the record
    job.py          the job: export() and the command line's run()
"""
from ..options import ExportOptions
from .job import ExportResult, export, run
from .source import ExportError, ExportTargetExists

__all__ = ["ExportError", "ExportOptions", "ExportResult", "ExportTargetExists", "export", "run"]
