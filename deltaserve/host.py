"""Host-to-device copies that never wait for the device.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits for the stream, so
under async scheduling it would stall the host until the step in flight is done. These helpers stage
the values in pinned memory and queue the copy behind the stream's work instead (the caching host
allocator keeps the staging buffer until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list, nested lists or a CPU tensor) as a tensor on ``device``, without a host wait."""
    if device.type != "cuda":
        return torch.as_tensor(values, dtype=dtype)
    if isinstance(values, torch.Tensor):
        host = values.to(dtype).pin_memory()
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)
