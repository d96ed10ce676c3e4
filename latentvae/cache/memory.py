"""Handing a batch from a DataLoader worker to the training process without copying it again: shared memory.

    x = batch_tensor((B, C, h, w))      # a new tensor; in a worker, in shared memory (as default_collate makes)
    y = shared_copy(x)                  # a new shared-memory tensor holding x, written through its file
    t = stacked_view(rows)              # the (B, ...) tensor rows read together already are, or None
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch


def batch_tensor(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new tensor; in a DataLoader worker in shared memory (as default_collate allocates), so
    the batch goes to the main process without being copied again. Always a fresh one: the batch a
    training loop holds is never written again."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def shared_copy(x: torch.Tensor) -> torch.Tensor:
    """A new shared-memory tensor holding the contiguous `x`, for a DataLoader worker to hand over.

    With torch's default file_descriptor sharing the bytes go in with os.pwrite, not through this
    process's mapping: a fresh mapping written page by page takes a page fault per 4 KiB page (~1,000
    for a 4 MiB batch, most of what writing it costs), while the write fills the same pages in the
    kernel. Linux: into a new memfd (anonymous shared memory, the kind torch maps when it receives a
    tensor; the pages are allocated by the write: creating torch's own shared memory of 2 MiB cost as
    much as filling it, measured), mapped as the tensor's storage. Else into batch_tensor's file; anything else: copied in.
    Always new memory: the batch a training loop holds is never written again."""
    file_descriptor = torch.multiprocessing.get_sharing_strategy() == "file_descriptor" and x.is_contiguous()
    if file_descriptor and hasattr(os, "memfd_create") and hasattr(torch.UntypedStorage, "_new_shared_fd_cpu"):
        data = memoryview(x.reshape(-1).view(torch.uint8).numpy())
        try:
            fd = os.memfd_create("latentvae-batch", os.MFD_CLOEXEC)
        except OSError:
            fd = None
        if fd is not None:
            try:
                done = 0
                while done < data.nbytes:
                    done += os.pwrite(fd, data[done:], done)
                storage = torch.UntypedStorage._new_shared_fd_cpu(fd, data.nbytes)  # maps a dup of fd
                return torch.empty(0, dtype=x.dtype).set_(storage, 0, x.shape)
            except (RuntimeError, OSError):
                pass
            finally:
                os.close(fd)
    out = batch_tensor(x.shape, x.dtype)
    if file_descriptor:
        try:
            fd, size = out.untyped_storage()._share_fd_cpu_()
            data = memoryview(x.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < min(size, data.nbytes):
                done += os.pwrite(fd, data[done:], done)
            if done == data.nbytes:
                return out
        except (AttributeError, RuntimeError, OSError, TypeError):
            pass
    return out.copy_(x)


def stacked_view(latents: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (B, C, h, w) tensor whose rows `latents` are, in order (how __getitems__ returns a batch), or None."""
    first = latents[0]
    if not first.is_contiguous():
        return None
    step, base = first.numel() * first.element_size(), first.data_ptr()
    storage = first.untyped_storage()
    if storage.nbytes() < step * len(latents) + first.storage_offset() * first.element_size():
        return None
    if any(x.untyped_storage().data_ptr() != storage.data_ptr() or x.data_ptr() != base + k * step
           or x.shape != first.shape or x.dtype != first.dtype or not x.is_contiguous() for k, x in enumerate(latents)):
        return None
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (len(latents), *first.shape))
