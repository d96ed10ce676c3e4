"""Run by test_multiprocess.py under torchrun: train, then write this rank's weights.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/ddp_worker.py OUT --set ...

OUT may contain `{rank}` (each process then gets its own folder, as on nodes without a shared
file system). Writes OUT/final-rank{r}.safetensors (the VAE) and, with the GAN on,
OUT/disc-init-rank{r}.safetensors and OUT/disc-final-rank{r}.safetensors.
"""
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from latentvae.config import load_config
from latentvae.train import Trainer


def _save(module, path):
    save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(path))


if __name__ == "__main__":
    out = Path(sys.argv[1].format(rank=os.environ.get("RANK", "0")))
    overrides = [a for a in sys.argv[2:] if a != "--set"]
    trainer = Trainer(load_config(None, overrides), out, show_progress=False)
    rank = trainer.acc.process_index
    if trainer.parts.disc is not None:
        _save(trainer.parts.disc_module(), out / f"disc-init-rank{rank}.safetensors")
    trainer.run()
    _save(trainer.vae, out / f"final-rank{rank}.safetensors")
    if trainer.parts.disc is not None:
        _save(trainer.parts.disc_module(), out / f"disc-final-rank{rank}.safetensors")
