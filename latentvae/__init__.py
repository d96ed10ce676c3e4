"""latentvae: train, export, encode with and evaluate the VAEs that diffusion models run in."""
__version__ = "0.1.0"
