"""latentvae: train, export, encode with and evaluate the VAEs that diffusion models run in."""
__version__ = "0.1.0"


def __getattr__(name):
    """`from latentvae import LatentDataset` (and LatentLoader, BucketBatchSampler, collate): loaded on first use."""
    if name in ("LatentDataset", "LatentLoader", "BucketBatchSampler", "collate"):
        from . import cache
        return getattr(cache, name)
    raise AttributeError(f"module 'latentvae' has no attribute {name!r}")
