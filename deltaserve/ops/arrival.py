"""Arrival counters for the "last program reduces" pattern of our Triton kernels.

The split-K skinny GEMM (``skinny_gemm.py``) and the split MoE router (``moe_router.py``) spread one
output tile over several programs; each writes an fp32 partial, then bumps the tile's counter (a CTA
barrier, then one acq_rel atomic), and the program that arrives last reduces the partials and resets
the counter to zero. So the counters are zero between launches: no memset launch, graph-capturable.

One int32 buffer per device, shared by both kernels: launches on one stream never overlap, and each
leaves its counters at zero. Two such launches must not run concurrently on two streams of one device
(deltaserve runs them on the compute stream only). The buffer must exist before CUDA-graph capture:
one made inside a capture would hold garbage until that graph first replays, so the engine calls
:func:`prepare` first and :func:`counters` refuses to make one while the stream is capturing.
"""

from __future__ import annotations

import torch

NUM_COUNTERS = 4096  # tiles per launch: 4096 row tiles of 16 covers any out_proj; router token blocks
_buffers: dict[torch.device, torch.Tensor] = {}


def _key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def prepare(device: torch.device | str) -> torch.Tensor:
    """Make ``device``'s zeroed counter buffer now (outside any CUDA-graph capture)."""
    return counters(device, 1)


def counters(device: torch.device | str, n: int) -> torch.Tensor:
    """``device``'s counter buffer, at least ``n`` long (all zero between launches)."""
    if n > NUM_COUNTERS:
        raise ValueError(f"{n} tiles exceed the {NUM_COUNTERS} arrival counters; use larger tiles")
    key = _key(device)
    buf = _buffers.get(key)
    if buf is None:
        if key.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the arrival counters of {key} must be made before CUDA-graph capture: call "
                               "deltaserve.ops.arrival.prepare(device) first (the engine does)")
        buf = _buffers[key] = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=key)
    return buf
