"""`latentvae train` (its few flags: the run's settings are config.py's) and `latentvae tradeoff` (a sweep of runs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .common import DATA_HELP, VAE_HELP, _positive
from .fields import REQUIRED, OptionError, opt


@dataclass(frozen=True)
class TrainOptions:
    """Train a KL-regularized VAE (or a plain autoencoder) of any diffusers family with Accelerate: from
    scratch (`--set model.preset=flux2-small`, listed below), or from any VAE (`--set model.init_from=VAE`,
    in full or `--set model.train_decoder_only=true`), or a video VAE's decoder on clips (`--set
    data.source=VIDEOS --set data.frames=N`, configs/video-decoder-finetune.yaml). Every config key is listed
    below; `--set section.key=value` overrides one (docs/training.md)."""
    out: str = opt(REQUIRED, "run folder: checkpoints, logs, preview grids")
    config: Optional[str] = opt(None, "YAML file of overrides (see configs/)")
    set: tuple[str, ...] = opt((), "override one config key, e.g. train.lr=1e-4 or model.preset=sd",
                               metavar="SECTION.KEY=VALUE")
    resume: Optional[str] = opt(None, "'latest': this run's newest checkpoint that verifies (the previous one if "
                                      "it is damaged; none yet: start from step 0), or a checkpoint folder")
    progress: bool = opt(True, "progress bar (logs go to TensorBoard either way)")


@dataclass(frozen=True)
class TradeoffOptions:
    """The blur tradeoff: train (or take) a set of autoencoders, evaluate them, draw the pictures."""
    data: str = opt(REQUIRED, "evaluation images: " + DATA_HELP)
    out: str = opt(REQUIRED, "folder: runs/, eval/, the plots and tradeoff.md")
    runs: tuple[str, ...] = opt((), "evaluate these VAEs instead of training the sweep (" + VAE_HELP + ")",
                                metavar="VAE")
    variants: tuple[str, ...] = opt((), "sweep variant to train (default: all of them; the names are listed in "
                                        "latentvae/tradeoff.py and docs/evaluation.md)", metavar="NAME")
    steps: int = opt(300, "training steps per sweep run")
    config: Optional[str] = opt(None, "training config the sweep starts from (default: configs/quickstart.yaml)")
    max_side: int = opt(256, "evaluation: downscale images whose long side exceeds this")
    lpips_dir: Optional[str] = opt(None, "folder of the LPIPS backbones (default: $LATENTVAE_LPIPS_DIR)")

    def check(self) -> None:
        _positive(steps=self.steps)
        if self.max_side < 0:
            raise OptionError(f"--max-side must be >= 0, got {self.max_side}")
        if self.runs and self.variants:
            raise OptionError("--variants chooses the sweep runs to train; with --runs nothing is trained")
