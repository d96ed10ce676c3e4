"""Run by test_multiprocess.py under torchrun: train, then write this rank's final weights.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/ddp_worker.py OUT --set ...
"""
import sys
from pathlib import Path

from safetensors.torch import save_file

from latentvae.config import load_config
from latentvae.trainer import Trainer

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), [a for a in sys.argv[2:] if a != "--set"]
    trainer = Trainer(load_config(None, overrides), out, show_progress=False)
    trainer.run()
    rank = trainer.acc.process_index
    save_file({k: v.contiguous() for k, v in trainer.vae.state_dict().items()}, str(out / f"final-rank{rank}.safetensors"))
