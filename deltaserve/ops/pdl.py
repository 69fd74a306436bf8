"""Programmatic dependent launch (PDL) for deltaserve's Triton kernels (Hopper and newer).

At decode a step is ~420 kernels of a few microseconds each, and between two of them the GPU idles
while the next one launches: 0.41 ms of a 2.97 ms step on the 35B-A3B shape (H200, N=1,
docs/perf/2026-11-28d.md). With PDL a kernel is launched with the programmatic-stream-serialization
attribute and may start while the previous kernel of the stream is still running; it must then wait
(``griddepcontrol.wait``) before it reads anything that kernel wrote.

Our kernels take a ``PDL`` constexpr and begin with :func:`pdl_gate`: wait for the previous kernel,
then allow the next one to launch (``griddepcontrol.launch_dependents``). Every read of this kernel
comes after its wait, so it is correct after any kind of kernel; the next kernel, launched early,
waits for this one in turn. What overlaps is the next kernel's launch and scheduling with this one's
execution. Kernels of other libraries (cuBLAS, torch) are launched as usual and keep the usual full
ordering. A PDL launch is also a normal launch where the attribute cannot apply (after a copy, across
streams), and ``griddepcontrol.wait`` is a no-op in a kernel launched without it.

On by default where it can run (``--no-pdl`` turns it off): process-wide, set by the engine at start-up
on a GPU of compute capability 9.0 or newer. Measured on an H200 (docs/perf/2026-11-28e.md, two
interleaved pairs): decode 2-4% faster at N = 4 and 16 on the 35B-A3B and 9B shapes, ~2% at N = 1
(within run-to-run noise there), tokens and logprobs bit-identical.

The GEMM kernels split the gate: :func:`pdl_wait` first, :func:`pdl_trigger` at the start or, for grids
that fill over half the GPU, after their main loop (:func:`late_trigger`). The skinny GEMM may issue L2
prefetches of its weights before the wait (``--skinny-prefetch``, off: docs/perf/2026-11-28g.md).

Under Triton's CPU interpreter PDL is never on (the interpreter has no ``griddepcontrol``); the kernels
are then exactly the non-PDL ones.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton never launch our kernels
    triton = None

_enabled = False
_late_trigger: bool | None = None
_preload = False

# Kernels without a model of what the GPU holds of them at once (the MoE experts) trigger late above this
# many programs (see :func:`late_trigger`).
LATE_TRIGGER_PROGRAMS = 512


def unavailable(device: torch.device | str | None = None) -> str | None:
    """Why PDL cannot run on ``device`` (with the fix), or None where it can."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton's interpreter (TRITON_INTERPRET=1) has no griddepcontrol: use --no-pdl (or leave it unset)"
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return "programmatic dependent launch needs a CUDA device: use --no-pdl (or leave it unset) on the CPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return (f"this GPU is compute capability {major}.{minor}; programmatic dependent launch needs 9.0 "
                "(Hopper) or newer: use --no-pdl (or leave it unset)")
    return None


def enable(on: bool, device: torch.device | str | None = None, late_trigger: bool | None = None,
           preload: bool = False) -> None:
    """Turn PDL on or off for every kernel launched afterwards in this process; ``late_trigger`` forces
    :func:`late_trigger`'s answer (None: by grid size); ``preload``: see :func:`preload`."""
    global _enabled, _late_trigger, _preload
    if on and (why := unavailable(device)):
        raise ValueError(f"pdl=True: {why}")
    _enabled, _late_trigger, _preload = on, late_trigger, on and preload


def preload() -> bool:
    """Whether kernels read, before their wait, what was written before the previous kernel started.

    Every deltaserve kernel waits before it triggers, so a kernel launched early starts only after the
    kernel *two* back has finished: what that one and everything before it wrote (the step's inputs, the
    router's top-k, the state of an earlier step) can be read before ``griddepcontrol.wait``, and only
    the previous kernel's output must wait. With it, the MoE down-projection loads its experts' weights
    (its ids come from the router, two kernels back) and the GDN decode kernel its state tile while the
    previous kernel runs (the MoE only where its w13 grid may trigger early: see ``fused_moe_triton``).
    Off by default (``--pdl-preload``): on an H100 it made the 35B-A3B step 0.2% faster at N=1 and
    0.4-0.8% slower at 2-16 tokens (docs/perf/2026-12-06.md): the kernels it overlaps with are
    already bandwidth-bound."""
    return _preload


def late_trigger(programs: int, capacity: int | None = None) -> bool:
    """Whether a kernel of ``programs`` programs should let the next kernel launch only after its main loop;
    ``capacity``: the programs of this kernel the whole GPU holds at once, where known.

    With the trigger at the start, the next kernel is placed on the SMs while this one runs, into the slots
    this one leaves free. Measured in chains of skinny GEMMs (H200, docs/perf/2026-11-28g.md): where a grid
    fills more than half of what the GPU holds, the next grid does not fit beside it, and the early trigger
    made the chain far slower: the 9B MLP gate_up (768 programs, 0.65 of capacity) 64.1 us a GEMM against
    48.9 without PDL and 48.5 with the late trigger; the 122B-A10B in_proj (0.54) 47.2 / 31.6 / 31.3; at
    32-64 tokens 0.61-0.73 of capacity, 7-26% slower. Grids filling 0.24-0.48 of it were 0.2-0.8 us faster
    with the early trigger, which hides the next launch behind the whole kernel. Without ``capacity``
    (kernels whose resources are not modelled), grids of more than 512 programs count as large."""
    if _late_trigger is not None:
        return _late_trigger
    return 2 * programs > capacity if capacity else programs > LATE_TRIGGER_PROGRAMS


def enabled() -> bool:
    return _enabled


def launch_args() -> dict:
    """Keyword arguments for a kernel launch: the ``PDL`` constexpr and, when on, Triton's ``launch_pdl``."""
    return {"PDL": True, "launch_pdl": True} if _enabled else {"PDL": False}


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel has finished and its writes are visible (a no-op without PDL)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def pdl_trigger(PDL: tl.constexpr):
        """Let the next kernel of the stream launch once every program of this one has come here (or ended)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_gate(PDL: tl.constexpr):
        """First statement of a kernel: wait for the previous kernel's writes, then let the next launch."""
        pdl_wait(PDL)
        pdl_trigger(PDL)

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask for the 128-byte lines at ``ptrs`` (valid addresses) to be brought into L2: a hint, nothing
        waited for. Only for data the previous kernel does not write (weights), so it may precede
        :func:`pdl_wait`."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
