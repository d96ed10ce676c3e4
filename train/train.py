"""Train a KL-regularized VAE (or a plain autoencoder) with Accelerate (= `latentvae train ...`).

    accelerate launch train/train.py --config configs/quickstart.yaml --out runs/quickstart
    accelerate launch train/train.py --config configs/quickstart.yaml --out runs/quickstart --resume latest
    accelerate launch train/train.py --config configs/quickstart.yaml --out RUN --set train.lr=1e-5 --set model.preset=sd
    accelerate launch -m latentvae train --config configs/quickstart.yaml --out RUN
    python train/train.py --help          # every config key with its default and meaning
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train/train.py --config ... --out ...
"""
from latentvae.cli import train_main

if __name__ == "__main__":
    train_main()
