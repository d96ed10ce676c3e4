"""The family table: one entry per diffusers autoencoder class, and everything that follows from it.

    fam = family_of(vae)                   # by class; family("flux2") by name
    mean, logvar = fam.moments(vae, x)     # (B, 3, H, W) in [-1, 1] -> 4-D moments; logvar None: deterministic
    mean, logvar = fam.moments(vae, clip)  # a video VAE: (B, 3, T, H, W) -> 5-D (B, C, T', H', W')
    x_hat = fam.decode(vae, z)             # 4-D VAE latents -> (B, 3, H, W); 5-D -> (B, 3, T, H, W)
    fam.temporal(vae), fam.frame_step(vae) # a video VAE's clips: 1 + step*k frames -> 1 + (T-1)/temporal latent frames
    fam.factors(vae)                       # what its pipeline's formula reads (conventions.py)

Every job reads this table instead of asking `isinstance`: the 5-D handling (the input's dimension says
image or clip: the 5-D classes get images as T=1, added and dropped here; a video VAE's clips stay 5-D), the
clip rule of a video VAE (its frame step, with the diffusers lines that fix it), which latent the family's
consumers take (sample or mode), its spatial factor and latent channels, which of conventions.py's
formulas its pipelines apply, which statistics calibration writes where, its fp16 rule, and which
jobs it can do. Adding a family is one entry here plus its tests.

| name         | class                      | consumers take             | formula (conventions.py)       | calibration writes       |
|--------------|----------------------------|----------------------------|--------------------------------|--------------------------|
| kl           | AutoencoderKL              | sample (SD/SDXL/SD3 training scripts) | sd, sdxl, sd3 (FLUX.1) | scaling/shift or latents_mean/std |
| flux2        | AutoencoderKLFlux2         | mode (FLUX.2 pipeline: argmax) | flux2 (2x2 patchify, BN)    | bn.running_mean/var (weights) |
| qwenimage    | AutoencoderKLQwenImage     | sample (Qwen-Image img2img) | qwenimage (per-channel)       | latents_mean/std (config) |
| wan          | AutoencoderKLWan           | mode (Wan v2v, i2v: argmax) | qwenimage (per-channel)       | latents_mean/std (config) |
| dc           | AutoencoderDC              | the latent (no posterior)  | sd (z * scaling_factor)        | scaling_factor           |
| hunyuanimage | AutoencoderKLHunyuanImage  | sample (retrieve_latents default) | sd (z * scaling_factor) | scaling_factor           |
| ltx2         | AutoencoderKLLTX2Video     | mode (LTX-2 i2v: argmax)   | ltx2 (per-channel, buffers)    | latents_mean/std buffers |
| hunyuanvideo15 | AutoencoderKLHunyuanVideo15 | mode (i2v: argmax)    | sd (z * scaling_factor)        | scaling_factor           |
| cogvideox    | AutoencoderKLCogVideoX     | sample (v2v: retrieve_latents default) | sd (z * scaling_factor) | scaling_factor     |
| tiny         | AutoencoderTiny            | the latent (no posterior)  | that of the VAE it mimics      | nothing (TAESD latents)  |

Clips (the video VAEs: wan, ltx2, hunyuanvideo15, cogvideox): 1 + step*k frames, step 4 (Wan, HunyuanVideo 1.5),
8 (LTX-2; CogVideoX, whose decoder needs an odd latent frame count), each with its `frames_cite`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import BadInputError

JOBS = ("evaluate", "encode", "decode", "export", "demo", "probe", "train", "train-decoder", "single-file",
        "encode-video", "evaluate-video", "train-decoder-video")
VIDEO_JOBS = ("encode-video", "evaluate-video", "train-decoder-video")


class FamilyCannot(BadInputError):
    """A job a family cannot do: one line naming the family and the job (exit status 2)."""


class TilingMismatch(BadInputError):
    """diffusers' tiled encode/decode of a video class gave a wrong size or failed for these tiles (exit 2)."""


def tile_words(vae) -> str:
    h, w = getattr(vae, "tile_sample_min_height", None), getattr(vae, "tile_sample_min_width", None)
    return f"{h}x{w} px" if h and w else "its default size"


def _unsqueeze(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2)  # (B, C, H, W) -> (B, C, T=1, H, W)


def _squeeze(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 5 or x.shape[2] != 1:
        raise ValueError(f"{what}: expected (B, C, 1, H, W), got {tuple(x.shape)}")
    return x[:, :, 0]


@dataclass(frozen=True)
class Family:
    name: str
    class_name: str
    used_by: str
    stochastic: bool  # a Gaussian posterior (latent_dist); False: encode returns the latent itself
    consumer: str  # "sample" | "mode" | "latent": what its pipelines / training scripts take from encode
    consumer_cite: str  # where in diffusers that is decided
    five_d: bool  # encode/decode take (B, C, T, H, W)
    patch: int  # the pipeline patchifies p x p latent pixels into channels before its formula (flux2: 2)
    conventions: tuple[str, ...]  # conventions.py formulas its pipelines apply; [0] is the default
    calibration: str  # which statistics `export --calibrate` writes, where
    fp16: str  # its fp16 rule
    jobs: tuple[str, ...]  # what it can do (JOBS); anything else is refused in one line
    refusals: dict  # job -> why not (the one line's reason)
    channels_of: Callable  # vae -> latent channels
    factor_of: Callable  # vae -> spatial downsampling factor
    grad_checkpointing: bool = False  # diffusers implements gradient checkpointing for the class
    pinnable: bool = True  # a plain-autoencoder run (model.mode=ae) can pin its log-variance (model.py)
    fp16_training: bool = True  # trains under fp16 autocast (else refused: bf16 or fp32)
    temporal_of: Optional[Callable] = None  # vae -> temporal downsampling factor; None: an image VAE (no clips)
    frame_step_of: Optional[Callable] = None  # vae -> s: clips of 1 + s*k frames decode to themselves
    frames_cite: str = ""  # where diffusers fixes that rule
    decode_temb: bool = False  # decode takes a timestep embedding (LTX-2 with timestep_conditioning)
    one_at_a_time: str = ""  # why the class must see one clip per call (then batches are split here)

    @property
    def video(self) -> bool:
        """The class encodes clips (B, 3, T, H, W): a video VAE."""
        return self.temporal_of is not None

    @property
    def cls(self) -> type:
        import diffusers
        return getattr(diffusers, self.class_name)

    # ------------------------------------------------------------------ running the module
    def _clip(self, x: torch.Tensor, what: str) -> bool:
        """Whether `x` is a clip batch (5-D); a clip for an image VAE is refused in one line."""
        if x.dim() == 5:
            if not self.video:
                raise FamilyCannot(f"{self.class_name} ({self.name} family) is an image VAE: it cannot {what} clips "
                                   f"(B, C, T, H, W); give it images, or a video VAE ({', '.join(VIDEO_FAMILIES)})")
            return True
        if x.dim() != 4:
            raise ValueError(f"{self.class_name}.{what}: expected (B, C, H, W) images or (B, C, T, H, W) clips, "
                             f"got {tuple(x.shape)}")
        return False

    def moments(self, vae, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[-1, 1] images (B, 3, H, W) -> 4-D (mean, logvar); clips (B, 3, T, H, W) -> 5-D (B, C, T', H', W');
        logvar None without a posterior."""
        clip = self._clip(x, "encode")
        if self.one_at_a_time and x.shape[0] > 1:
            parts = [self.moments(vae, x[i:i + 1]) for i in range(x.shape[0])]
            return (torch.cat([m for m, _ in parts]),
                    None if parts[0][1] is None else torch.cat([lv for _, lv in parts]))
        out = self._run(vae, "encode", vae.encode, x if clip or not self.five_d else _unsqueeze(x))
        if self.stochastic:
            dist = out.latent_dist
            mean, logvar = dist.mean, dist.logvar
        else:
            mean, logvar = (out.latents if self.name == "tiny" else out.latent), None
        if clip:
            f, t = self.factor(vae), self.temporal(vae)
            self._check_shape(vae, "encode", x, mean, (1 + (x.shape[2] - 1) // t, x.shape[3] // f, x.shape[4] // f))
        if self.five_d and not clip:
            mean = _squeeze(mean, f"{self.class_name}.encode")
            logvar = None if logvar is None else _squeeze(logvar, f"{self.class_name}.encode")
        return mean, logvar

    def consumer_latent(self, mean: torch.Tensor, logvar: Optional[torch.Tensor],
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The latent this family's consumers take: a posterior sample, or its mode (the mean)."""
        if logvar is None or self.consumer != "sample":
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        """4-D VAE latents -> [-1, 1] images (B, 3, H, W); 5-D -> clips (B, 3, T, H, W)."""
        clip = self._clip(z, "decode")
        if self.one_at_a_time and z.shape[0] > 1:
            return torch.cat([self.decode(vae, z[i:i + 1]) for i in range(z.shape[0])])
        z5 = z if clip or not self.five_d else _unsqueeze(z)
        if self.decode_temb and vae.config.get("timestep_conditioning"):
            # pipeline_ltx2.py:1636-1650: decode_timestep 0.0 by default, the latents noised by a scale of 0
            x = self._run(vae, "decode", vae.decode, z5, torch.zeros(z5.shape[0], device=z5.device, dtype=z5.dtype)).sample
        else:
            x = self._run(vae, "decode", vae.decode, z5).sample
        if clip:
            f, t = self.factor(vae), self.temporal(vae)
            self._check_shape(vae, "decode", z, x, (1 + (z.shape[2] - 1) * t, z.shape[3] * f, z.shape[4] * f))
        return _squeeze(x, f"{self.class_name}.decode") if self.five_d and not clip else x

    def _run(self, vae, what: str, fn, *args):
        """`fn(*args)`; with the class's tiling on, a failure of diffusers' tiled code is one line saying so."""
        if not getattr(vae, "use_tiling", False):
            return fn(*args)
        try:
            return fn(*args)
        except RuntimeError as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise TilingMismatch(f"{self.class_name}: diffusers' tiled {what} failed on {tuple(args[0].shape)} with tiles "
                                 f"of {tile_words(vae)} ({' '.join(str(e).split())[:160]}); use its default tiles "
                                 "(--tiling without --tile-size) or another --tile-size") from e

    def _check_shape(self, vae, what: str, given: torch.Tensor, got: torch.Tensor, expected: tuple) -> None:
        """A clip's latent (or decoded clip) must have the size the pipelines compute: diffusers' tiled code of
        some classes returns another for tiles that do not divide the frame (CogVideoX, HunyuanVideo 1.5)."""
        if tuple(got.shape[2:]) != tuple(expected):
            how = f"with tiles of {tile_words(vae)}" if getattr(vae, "use_tiling", False) else "untiled"
            raise TilingMismatch(f"{self.class_name}: {what} of {tuple(given.shape)} gave {tuple(got.shape)}, not "
                                 f"T, H, W = {tuple(expected)} ({how}); " + (
                                     "use its default tiles (--tiling without --tile-size) or a --tile-size whose "
                                     "tiles divide the frame" if getattr(vae, "use_tiling", False) else
                                     f"give it clips of 1 + {self.frame_step(vae)}k frames"))

    def temporal(self, vae) -> int:
        return int(self.temporal_of(vae)) if self.video else 1

    def frame_step(self, vae) -> int:
        return int(self.frame_step_of(vae)) if self.video else 1

    # ------------------------------------------------------------------ what the module holds
    def channels(self, vae) -> int:
        return int(self.channels_of(vae))

    def factor(self, vae) -> int:
        return int(self.factor_of(vae))

    def factors(self, vae) -> dict:
        """The entries this family's formula reads, as the module holds them now (conventions.py)."""
        c = vae.config
        if self.name == "flux2":
            return {"bn_running_mean": [float(v) for v in vae.bn.running_mean],
                    "bn_running_var": [float(v) for v in vae.bn.running_var], "batch_norm_eps": float(c.batch_norm_eps)}
        if self.name in ("qwenimage", "wan"):
            return {"latents_mean": list(c.latents_mean), "latents_std": list(c.latents_std)}
        if self.name == "ltx2":  # buffers in the weights file, and the config's scaling_factor
            return {"latents_mean": [float(v) for v in vae.latents_mean], "latents_std": [float(v) for v in vae.latents_std],
                    "scaling_factor": float(c.scaling_factor)}
        if self.name == "tiny":
            from .convert import taesd_factors
            scale, shift = taesd_factors(vae)
            return {"scaling_factor": scale, "shift_factor": shift}
        keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std") if self.name == "kl" else ("scaling_factor",)
        # (cogvideox's config also holds shift_factor / latents_mean / latents_std, which its pipelines never read)
        return {k: c.get(k) for k in keys}

    @torch.no_grad()
    def write_factors(self, vae, entries: dict) -> None:
        """Put calibrated entries (conventions.diffusers_config) where this family's pipeline reads them."""
        if self.name == "flux2":
            vae.bn.running_mean.copy_(torch.tensor(entries["bn_running_mean"], dtype=vae.bn.running_mean.dtype))
            vae.bn.running_var.copy_(torch.tensor(entries["bn_running_var"], dtype=vae.bn.running_var.dtype))
            return
        if self.name == "ltx2":
            vae.latents_mean.copy_(torch.tensor(entries["latents_mean"], dtype=vae.latents_mean.dtype))
            vae.latents_std.copy_(torch.tensor(entries["latents_std"], dtype=vae.latents_std.dtype))
        self.require("export")
        vae.register_to_config(**{k: v for k, v in entries.items() if k in self.config_keys})

    @property
    def config_keys(self) -> tuple[str, ...]:
        """config.json entries calibration writes (flux2: none, its statistics are BatchNorm buffers)."""
        return {"kl": ("scaling_factor", "shift_factor", "latents_mean", "latents_std"),
                "qwenimage": ("latents_mean", "latents_std"), "wan": ("latents_mean", "latents_std"),
                "dc": ("scaling_factor",), "hunyuanimage": ("scaling_factor",), "ltx2": ("scaling_factor",),
                "hunyuanvideo15": ("scaling_factor",), "cogvideox": ("scaling_factor",)}.get(self.name, ())

    def decoder_parameters(self, vae) -> list:
        """What a decoder-only fine-tune trains: the decoder and the 1x1 conv before it."""
        mods = [vae.decoder] + [m for m in (getattr(vae, "post_quant_conv", None),) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def last_decoder_layer(self, vae) -> torch.nn.Parameter:
        """The weight whose gradient norm sets the adaptive GAN weight (LDM's get_last_layer)."""
        convs = [m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        out = getattr(vae.decoder, "conv_out", None)
        out = getattr(out, "conv", out)  # the video classes wrap their causal Conv3d
        return (out.weight if isinstance(out, (torch.nn.Conv2d, torch.nn.Conv3d)) else convs[-1].weight)

    # ------------------------------------------------------------------ what it can do
    def require(self, job: str, label: str = "") -> None:
        """A FamilyCannot naming the family and the job unless the family can do it."""
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}")
        if job not in self.jobs:
            why = self.refusals.get(job) or (f"it is an image VAE (no time axis); clips take a video VAE "
                                             f"({', '.join(VIDEO_FAMILIES)})" if job in VIDEO_JOBS else "not supported")
            who = f"{label}: " if label else ""
            raise FamilyCannot(f"{who}{self.class_name} ({self.name} family) cannot {JOB_WORDS[job]}: {why}")


JOB_WORDS = {"evaluate": "be evaluated", "encode": "encode a dataset", "decode": "decode latents",
             "export": "be exported", "demo": "run the demos", "probe": "be probed", "train": "be fine-tuned in full",
             "train-decoder": "have its decoder fine-tuned",
             "single-file": "be written as one single file (--format single-file)",
             "encode-video": "encode a video dataset", "evaluate-video": "be evaluated on videos",
             "train-decoder-video": "have its decoder fine-tuned on clips"}
ALL_JOBS = ("evaluate", "encode", "decode", "export", "demo", "probe", "train", "train-decoder")
NO_SINGLE_FILE = ("diffusers has no single-file loader for this class (loaders/single_file_model.py "
                  "SINGLE_FILE_LOADABLE_CLASSES); export a diffusers folder (the default --format diffusers)")


def _kl_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _wan_factor(vae) -> int:  # the pipelines' 2 ** len(temperal_downsample), times Wan 2.2's patchify
    return 2 ** len(vae.config.temperal_downsample) * (vae.config.get("patch_size") or 1)


def _tiny_factor(vae) -> int:
    return 2 ** sum(1 for m in vae.encoder.layers if isinstance(m, torch.nn.Conv2d) and m.stride[0] == 2)


_KL_CHANNELS = lambda vae: vae.config.latent_channels  # noqa: E731
_Z_DIM = lambda vae: vae.config.z_dim  # noqa: E731
_HALF_OK = "fp16 as measured by export's fp16 check (force_upcast follows it)"

NO_LDM_LAYOUT = ("latentvae writes the LDM single-file layout of AutoencoderKL only; export a diffusers folder (the "
                 "default --format diffusers)")
NO_POSTERIOR = ("it has no posterior (a deterministic latent); fine-tune its decoder with model.mode=ae and "
                "model.train_decoder_only=true")
IMAGE_JOBS = ("evaluate", "encode", "decode", "export", "demo", "probe", "train-decoder")
NO_VIDEO_FULL = ("a full fine-tune of a video VAE is not built (its encoder's KL on clips); fine-tune its decoder "
                 "with model.train_decoder_only=true")


def _wan_step(vae) -> int:
    return 2 ** sum(vae.config.temperal_downsample)

# Lines cited are diffusers 0.42.1's pipelines/...; the formulas' own citations are in conventions.py.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(name="kl", class_name="AutoencoderKL", used_by="SD 1.x/2.x, SDXL, SD3, FLUX.1, Z-Image, Chroma",
           stochastic=True, consumer="sample",
           consumer_cite="stable_diffusion/pipeline_stable_diffusion_img2img.py:769, stable_diffusion_xl/"
                         "pipeline_stable_diffusion_xl_img2img.py:740, stable_diffusion_3/pipeline_stable_diffusion_3_"
                         "img2img.py:700: retrieve_latents(...) (sample_mode \"sample\"), as the training scripts' "
                         "latent_dist.sample()",
           five_d=False, patch=1, conventions=("sd", "sdxl", "sd3"),
           calibration="scaling_factor (and shift_factor for sd3, latents_mean/latents_std for sdxl) in config.json",
           fp16=_HALF_OK, jobs=ALL_JOBS + ("single-file",), refusals={},
           channels_of=_KL_CHANNELS, factor_of=_kl_factor, grad_checkpointing=True),
    Family(name="flux2", class_name="AutoencoderKLFlux2", used_by="FLUX.2", stochastic=True, consumer="mode",
           consumer_cite="flux2/pipeline_flux2.py:610 `_encode_vae_image`: retrieve_latents(..., sample_mode=\"argmax\")",
           five_d=False, patch=2, conventions=("flux2",),
           calibration="bn.running_mean / bn.running_var (BatchNorm buffers in the weights file) of the 2x2-"
                       "patchified latent",
           fp16=_HALF_OK, jobs=ALL_JOBS, refusals={"single-file": NO_SINGLE_FILE},
           channels_of=_KL_CHANNELS, factor_of=_kl_factor, grad_checkpointing=True),
    Family(name="qwenimage", class_name="AutoencoderKLQwenImage", used_by="Qwen-Image, Qwen-Image-Edit",
           stochastic=True, consumer="sample",
           consumer_cite="qwenimage/pipeline_qwenimage_img2img.py:235-240 `_encode_vae_image`: retrieve_latents(...) "
                         "(sample_mode \"sample\")",
           five_d=True, patch=1, conventions=("qwenimage",), calibration="latents_mean / latents_std in config.json",
           fp16=_HALF_OK, jobs=ALL_JOBS, refusals={"single-file": NO_SINGLE_FILE},
           channels_of=_Z_DIM, factor_of=_wan_factor),
    Family(name="wan", class_name="AutoencoderKLWan", used_by="Wan 2.1/2.2 (clips; images as T=1)", stochastic=True,
           consumer="mode",
           consumer_cite="wan/pipeline_wan_video2video.py:424 and wan/pipeline_wan_i2v.py:454-458: retrieve_latents(..., "
                         "sample_mode=\"argmax\")",
           five_d=True, patch=1, conventions=("qwenimage",), calibration="latents_mean / latents_std in config.json",
           fp16=_HALF_OK, jobs=ALL_JOBS + VIDEO_JOBS, refusals={"single-file": NO_LDM_LAYOUT},
           channels_of=_Z_DIM, factor_of=_wan_factor,
           temporal_of=lambda vae: 2 ** sum(vae.config.temperal_downsample), frame_step_of=_wan_step,
           frames_cite="wan/pipeline_wan.py:494-498 (num_frames % vae_scale_factor_temporal must be 1), :341; "
                       "pipeline_wan_video2video.py:217 (2 ** sum(temperal_downsample))"),
    Family(name="dc", class_name="AutoencoderDC", used_by="SANA (f32c32)", stochastic=False, consumer="latent",
           consumer_cite="AutoencoderDC.encode returns EncoderOutput.latent: no posterior",
           five_d=False, patch=1, conventions=("sd",),
           calibration="scaling_factor in config.json (sana/pipeline_sana.py:961 decodes latents / scaling_factor)",
           fp16="inference in fp16 as export's fp16 check measures; training in bf16 or fp32 only (under fp16 "
                "autocast its gradients overflow even unscaled)",
           jobs=IMAGE_JOBS, refusals={"train": NO_POSTERIOR, "single-file": NO_LDM_LAYOUT},
           channels_of=_KL_CHANNELS, factor_of=lambda vae: 2 ** (len(vae.config.encoder_block_out_channels) - 1),
           fp16_training=False),
    Family(name="hunyuanimage", class_name="AutoencoderKLHunyuanImage", used_by="HunyuanImage 2.1 (f32, 64 channels)",
           stochastic=True, consumer="sample",
           consumer_cite="retrieve_latents' default sample_mode=\"sample\" (hunyuan_image/pipeline_hunyuanimage_"
                         "refiner.py:125; the 2.1 pipeline never encodes)",
           five_d=False, patch=1, conventions=("sd",),
           calibration="scaling_factor in config.json (hunyuan_image/pipeline_hunyuanimage.py:858 decodes "
                       "latents / scaling_factor)",
           fp16=_HALF_OK, jobs=ALL_JOBS, refusals={"single-file": NO_SINGLE_FILE},
           channels_of=_KL_CHANNELS, factor_of=lambda vae: vae.config.spatial_compression_ratio, pinnable=False),
    Family(name="ltx2", class_name="AutoencoderKLLTX2Video", used_by="LTX-2 (video; f32 spatially, 8 temporally)",
           stochastic=True, consumer="mode",
           consumer_cite="ltx2/pipeline_ltx2_image2video.py:837-842 and pipeline_ltx2_condition.py:1148-1152: "
                         "retrieve_latents(..., \"argmax\")",
           five_d=True, patch=1, conventions=("ltx2",),
           calibration="latents_mean / latents_std buffers (in the weights file); scaling_factor stays in config.json",
           fp16=_HALF_OK, jobs=IMAGE_JOBS + VIDEO_JOBS, refusals={"train": NO_VIDEO_FULL, "single-file": NO_SINGLE_FILE},
           channels_of=_KL_CHANNELS, factor_of=lambda vae: vae.spatial_compression_ratio,
           grad_checkpointing=True, temporal_of=lambda vae: vae.temporal_compression_ratio,
           frame_step_of=lambda vae: vae.temporal_compression_ratio,
           frames_cite="ltx2/pipeline_ltx2.py:797, :1272 ((num_frames - 1) // vae_temporal_compression_ratio + 1); "
                       "pipeline_ltx2_condition.py:843 (rounds num_frames to 1 + 8k)",
           decode_temb=True),
    Family(name="hunyuanvideo15", class_name="AutoencoderKLHunyuanVideo15",
           used_by="HunyuanVideo 1.5 (video; f16 spatially, 4 temporally)", stochastic=True, consumer="mode",
           consumer_cite="hunyuan_video1_5/pipeline_hunyuan_video1_5_image2video.py:386: retrieve_latents(..., "
                         "sample_mode=\"argmax\")",
           five_d=True, patch=1, conventions=("sd",), calibration="scaling_factor in config.json",
           fp16=_HALF_OK, jobs=IMAGE_JOBS + VIDEO_JOBS, refusals={"train": NO_VIDEO_FULL, "single-file": NO_SINGLE_FILE},
           channels_of=_KL_CHANNELS, factor_of=lambda vae: vae.config.spatial_compression_ratio,
           grad_checkpointing=True, temporal_of=lambda vae: vae.config.temporal_compression_ratio,
           frame_step_of=lambda vae: vae.config.temporal_compression_ratio,
           frames_cite="hunyuan_video1_5/pipeline_hunyuan_video1_5.py:495 ((num_frames - 1) // "
                       "vae_scale_factor_temporal + 1)",
           one_at_a_time="diffusers 0.42.1's causal attention mask (models/autoencoders/autoencoder_kl_hunyuanvideo15.py:"
                         "150-154) is (B, L, L) against (B, 1, L, L) queries: a batch of more than one fails"),
    Family(name="cogvideox", class_name="AutoencoderKLCogVideoX", used_by="CogVideoX 1.0/1.5 (video; f8, 4 temporally)",
           stochastic=True, consumer="sample",
           consumer_cite="cogvideo/pipeline_cogvideox_video2video.py:382-385: retrieve_latents(...) (sample_mode "
                         "\"sample\")",
           five_d=True, patch=1, conventions=("sd",), calibration="scaling_factor in config.json",
           fp16="fp32 by default (its config says force_upcast); fp16 as export's fp16 check measures",
           jobs=IMAGE_JOBS + VIDEO_JOBS, refusals={"train": NO_VIDEO_FULL, "single-file": NO_SINGLE_FILE},
           channels_of=_KL_CHANNELS, factor_of=lambda vae: 2 ** (len(vae.config.block_out_channels) - 1),
           grad_checkpointing=True, temporal_of=lambda vae: vae.config.temporal_compression_ratio,
           frame_step_of=lambda vae: 2 * vae.config.temporal_compression_ratio,
           frames_cite="cogvideo/pipeline_cogvideox.py:336 ((num_frames - 1) // vae_scale_factor_temporal + 1); the "
                       "decoder works in pairs of latent frames after an odd first batch (models/autoencoders/"
                       "autoencoder_kl_cogvideox.py:1185-1198), so the latent frame count must be odd: 1 + 8k frames "
                       "(the published 49)"),
    Family(name="tiny", class_name="AutoencoderTiny", used_by="TAESD previews (SD, SDXL, SD3, FLUX.1 latent spaces)",
           stochastic=False, consumer="latent",
           consumer_cite="AutoencoderTiny.encode returns AutoencoderTinyOutput.latents: no posterior",
           five_d=False, patch=1, conventions=("sd", "sdxl", "sd3"),
           calibration="nothing: TAESD latents are the target VAE's latents, already normalized",
           fp16="fp16 safe (TAESD's published weights run in fp16)",
           jobs=IMAGE_JOBS, refusals={"train": NO_POSTERIOR, "single-file": NO_SINGLE_FILE},
           channels_of=lambda vae: vae.config.latent_channels, factor_of=_tiny_factor),
)}
BY_CLASS = {f.class_name: f for f in FAMILIES.values()}
VIDEO_FAMILIES = tuple(f.name for f in FAMILIES.values() if f.video)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise BadInputError(f"unknown VAE family {name!r}; valid choices: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(vae) -> Family:
    """The entry for a module's class (a subclass counts as its diffusers parent)."""
    for cls in type(vae).__mro__:
        if cls.__name__ in BY_CLASS:
            return BY_CLASS[cls.__name__]
    raise BadInputError(f"{type(vae).__name__} is not a VAE family latentvae knows; expected one of "
                        f"{', '.join(BY_CLASS)}")


# diffusers autoencoders that are not image VAEs: named in the refusal, so it says what the folder is
NOT_IMAGE_VAES = {
    **dict.fromkeys(("AutoencoderKLLTXVideo", "AutoencoderKLHunyuanVideo", "AutoencoderKLMochi", "AutoencoderKLAllegro",
                     "AutoencoderKLCosmos", "AutoencoderKLMagvit", "AutoencoderKLTemporalDecoder", "AutoencoderKLKVAEVideo",
                     "AutoencoderKLMiniMaxH3", "AutoencoderVidTok"), "a video VAE latentvae does not take yet"),
    **dict.fromkeys(("AutoencoderOobleck", "AutoencoderKLLTX2Audio", "AutoencoderKLKVAEAudio", "MMAudioVAE",
                     "AutoencoderKLMiniMaxH3Audio"), "an audio VAE"),
    "ConsistencyDecoderVAE": "a decoder-only consistency model (no encoder of its own)",
}


def family_for_class(class_name, where: str) -> Family:
    """The entry for a config.json's `_class_name`; a one-line error naming `where` otherwise."""
    if class_name in NOT_IMAGE_VAES:
        raise BadInputError(f"{where}: _class_name is {class_name!r}, {NOT_IMAGE_VAES[class_name]}; latentvae's jobs "
                            f"take {', '.join(BY_CLASS)}")
    if class_name not in BY_CLASS:
        raise BadInputError(f"{where}: _class_name is {class_name!r}; expected one of {', '.join(BY_CLASS)}")
    return BY_CLASS[class_name]
