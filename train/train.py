"""Train a KL-regularized VAE (or a plain autoencoder) with Accelerate.

    accelerate launch train/train.py --config configs/quickstart.yaml --output-dir runs/quickstart
    accelerate launch train/train.py --config configs/quickstart.yaml --output-dir runs/quickstart --resume latest
    accelerate launch train/train.py --config configs/sd-finetune.yaml --set train.lr=1e-5 --set model.preset=sd
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train/train.py --config ... --output-dir ...
"""
from latentvae.cli import train_main

if __name__ == "__main__":
    train_main()
