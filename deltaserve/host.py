"""Host-to-device copies that never wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits for the stream, so
under async scheduling it would stall the host until the step in flight is done. These helpers stage
the values in pinned memory and queue the copy behind the stream's work instead (the caching host
allocator keeps the staging buffer until the copy has run).
"""

from __future__ import annotations

import torch


def pinned(values, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (a list, nested lists or a CPU tensor) in pinned host memory: the source of a
    ``copy_(..., non_blocking=True)`` into an existing device tensor (which records the copy with the
    allocator, so the buffer is not reused before the copy has run)."""
    if isinstance(values, torch.Tensor):
        return values.to(dtype).pin_memory()
    return torch.tensor(values, dtype=dtype, pin_memory=True)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list, nested lists or a CPU tensor) as a tensor on ``device``, without a host wait."""
    if device.type != "cuda":
        return torch.as_tensor(values, dtype=dtype)
    return pinned(values, dtype).to(device, non_blocking=True)
