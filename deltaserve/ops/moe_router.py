"""Router of a sparse MoE block in one launch: gate GEMV, softmax, top-k, renormalise, shared-expert slot.

Per token ``t``: ``logits = x[t] @ w_gate.T`` (fp32 accumulation), ``p = softmax(logits)`` over the E
experts in fp32, the k largest, rescaled to sum to 1 when ``renormalize`` (``norm_topk_prob``). With
``w_shared_gate`` ``[1, H]`` (the shared expert folded into the routed experts as expert E, see
``layers/moe.py``) one more slot follows: id ``E``, weight ``sigmoid(x[t] · w_shared_gate)``. Eager
PyTorch needs about ten launches for this (GEMV, cast, softmax, topk, sum, div, cast, gate GEMV,
sigmoid); at decode each costs a few microseconds whatever its bytes.

**The kernel.** Grid ``(token blocks, parts)``. The gate GEMV streams the whole ``w_gate`` (1 MB for
E=256, H=2048 in bf16), which one SM would read at ~100 GB/s, so at decode sizes each token block is
split into ``parts`` programs, one per (expert block, H slice) *unit*; each writes its fp32 partial
logits to a workspace and bumps a per-token-block counter, and the program that arrives last sums
the partials and runs the softmax/top-k epilogue (the "last block reduces" pattern of CUTLASS's
serial split-K: a CTA barrier, then one acq_rel atomic). The last program resets its counter, so the
counters stay zero between launches: no memset launch, graph-capturable. Long prefills use one program
per token block (all units in-program, no counter).

**Ties.** Top-k is an iterative max over the logits; among equal logits the lowest expert index wins.
``torch.topk`` (the reference) does not promise an order for ties, so tests compare ids exactly only
on tie-free inputs. Selecting on logits rather than on the rounded probabilities keeps the order
strict wherever the logits differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.ops.arrival import NUM_COUNTERS, counters
from deltaserve.ops.pdl import launch_args

try:
    import triton
    import triton.language as tl

    from deltaserve.ops.pdl import pdl_gate
except ImportError:  # pragma: no cover - CPU installs without triton use the reference
    triton = None

# Workspaces go through this hook so that tests can hand out poisoned buffers.
_empty = torch.empty


# -- reference (the CPU path, and what the kernel is tested against) -----------------------------------


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits ``[T, E]`` -> ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.

    Softmax in fp32 over all E experts, then ``torch.topk`` (its tie order); with ``renormalize``
    (``norm_topk_prob``) the k weights are rescaled to sum to 1. Plain torch ops: graph-capturable.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E]; got {tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k must be in [1, E={router_logits.shape[1]}]; got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_router_ref(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    top_k: int,
    renormalize: bool,
    w_shared_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``moe_router`` (same shapes): fp32 logits, then ``moe_route``, then the shared slot."""
    _check(x, w_gate, top_k, w_shared_gate)
    xf = x.float()
    weights, ids = moe_route(xf @ w_gate.float().t(), top_k, renormalize)  # [T, k] each
    if w_shared_gate is None:
        return weights, ids
    shared_w = torch.sigmoid(xf @ w_shared_gate.float().t())  # [T, 1]
    shared_id = torch.full_like(ids[:, :1], w_gate.shape[0])  # [T, 1], expert E
    return torch.cat([weights, shared_w], 1), torch.cat([ids, shared_id], 1)


def _check(x, w_gate, top_k, w_shared_gate) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got {tuple(x.shape)}")
    H = x.shape[1]
    if w_gate.dim() != 2 or w_gate.shape[1] != H:
        raise ValueError(f"w_gate must be [E, H={H}]; got {tuple(w_gate.shape)}")
    if not 1 <= top_k <= w_gate.shape[0]:
        raise ValueError(f"top_k must be in [1, E={w_gate.shape[0]}]; got {top_k}")
    others = [w_gate] if w_shared_gate is None else [w_gate, w_shared_gate]
    if w_shared_gate is not None and tuple(w_shared_gate.shape) != (1, H):
        raise ValueError(f"w_shared_gate must be [1, H={H}]; got {tuple(w_shared_gate.shape)}")
    if any(t.dtype != x.dtype for t in others):
        raise ValueError(f"x and the gate weights must share a dtype; got x {x.dtype}, "
                         f"weights {[t.dtype for t in others]}")
    if any(t.device != x.device for t in others):
        raise ValueError(f"x and the gate weights must be on one device; got x on {x.device}, "
                         f"weights on {[str(t.device) for t in others]}")


# -- the Triton kernel ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """Tiles of the router kernel. A *unit* is one (expert block of ``block_e``, H slice) pair; there
    are ``cdiv(E, block_e) · split_k`` units per token block.

    ``split``: one program per unit plus the last-arriver epilogue (decode: many programs stream
    ``w_gate``), else one program per token block that does every unit itself (``split_k`` must be 1).
    """

    block_t: int
    block_e: int
    block_k: int
    split_k: int = 1
    split: bool = True
    num_warps: int = 4
    num_stages: int = 2


def pick_router_config(T: int, E: int, H: int) -> RouterConfig:
    """The tiles for T tokens (a prediction from the shapes; ``scripts/bench_moe.py --sweep`` times them).

    - T <= 64 (decode): split units of 16 experts x 512 columns, 16 KB of bf16 each; E=256, H=2048
      gives 64 programs per token block, enough to stream ``w_gate`` from many SMs at once.
    - T <= 1024 (large decode batches, short prefills): 32-token blocks, units of 32 experts x 1024.
    - longer prefills: one program per 32 tokens with all experts in one accumulator, so x and
      ``w_gate`` are read once per token block and no counter is needed.
    """
    if T <= 64:
        return RouterConfig(block_t=16, block_e=16, block_k=256, split_k=max(1, H // 512))
    if T <= 1024:
        return RouterConfig(block_t=32, block_e=32, block_k=128, split_k=max(1, H // 1024), num_warps=8)
    e_pad = max(16, triton.next_power_of_2(E))  # tl.dot's minimum tile width
    return RouterConfig(block_t=32, block_e=e_pad, block_k=max(16, 16384 // e_pad), split=False, num_warps=8)


if triton is not None:

    @triton.jit
    def _router_kernel(
        x_ptr, wg_ptr, wsg_ptr, part_ptr, counter_ptr, weights_ptr, ids_ptr,
        T, stride_xt, stride_we, stride_pk, stride_pt,
        H: tl.constexpr, E: tl.constexpr, TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr,
        RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, SPLIT: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
        PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Grid (cdiv(T, BLOCK_T), units if SPLIT else 1). part [SPLIT_K, T, E (+1)] fp32: column E holds
        the shared gate's partial logit. Invariant: every partial of a token block is written before
        the one program that reads them starts its epilogue."""
        pdl_gate(PDL)
        NUM_EB: tl.constexpr = (E + BLOCK_E - 1) // BLOCK_E
        K_SLICE: tl.constexpr = ((H + SPLIT_K - 1) // SPLIT_K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
        UNITS: tl.constexpr = 1 if SPLIT else NUM_EB * SPLIT_K
        pid_t = tl.program_id(0)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
        for i in range(UNITS):
            unit = tl.program_id(1) * UNITS + i
            eb, ks = unit % NUM_EB, unit // NUM_EB
            offs_e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
            e_ok = offs_e < E
            shared_here = eb == 0  # the first expert block also does the shared gate
            acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
            acc_sg = tl.zeros([BLOCK_T], dtype=tl.float32)
            for k0 in range(0, K_SLICE, BLOCK_K):
                offs_k = ks * K_SLICE + k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H
                a = tl.load(x_rows + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # [BT, BK]
                b = tl.load(wg_ptr + offs_e[None, :] * stride_we + offs_k[:, None],
                            mask=k_ok[:, None] & e_ok[None, :], other=0.0)  # [BK, BE]
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                if HAS_SHARED:
                    sg = tl.load(wsg_ptr + offs_k, mask=k_ok & shared_here, other=0.0)  # [BK]
                    acc_sg += tl.sum(a.to(tl.float32) * sg.to(tl.float32)[None, :], axis=1)
            p_rows = part_ptr + ks * stride_pk + offs_t[:, None] * stride_pt
            tl.store(p_rows + offs_e[None, :], acc, mask=t_ok[:, None] & e_ok[None, :])
            if HAS_SHARED:
                tl.store(p_rows + E, acc_sg[:, None], mask=t_ok[:, None] & shared_here)
        tl.debug_barrier()  # all of this program's partials are stored (CTA-wide) before it signals
        if SPLIT:
            if tl.atomic_add(counter_ptr + pid_t, 1, sem="acq_rel", scope="gpu") == NUM_EB * SPLIT_K - 1:
                tl.store(counter_ptr + pid_t, 0)  # the last arrival: no other program touches it again
                _route_epilogue(part_ptr, weights_ptr, ids_ptr, offs_t, t_ok, stride_pk, stride_pt,
                                E, TOP_K, HAS_SHARED, RENORM, BLOCK_T, SPLIT_K, E_PAD, K_PAD)
        else:
            _route_epilogue(part_ptr, weights_ptr, ids_ptr, offs_t, t_ok, stride_pk, stride_pt,
                            E, TOP_K, HAS_SHARED, RENORM, BLOCK_T, SPLIT_K, E_PAD, K_PAD)

    @triton.jit
    def _route_epilogue(
        part_ptr, weights_ptr, ids_ptr, offs_t, t_ok, stride_pk, stride_pt,
        E: tl.constexpr, TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    ):  # fmt: skip
        """Sum the SPLIT_K partials, softmax, top-k (lowest index wins ties), renormalise, shared slot."""
        K_OUT: tl.constexpr = TOP_K + HAS_SHARED
        offs_e = tl.arange(0, E_PAD)
        e_ok = offs_e < E
        p_rows = part_ptr + offs_t[:, None] * stride_pt
        logits = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
        for ks in tl.static_range(SPLIT_K):  # .cg: read L2, where the other programs' stores landed
            logits += tl.load(p_rows + ks * stride_pk + offs_e[None, :], mask=t_ok[:, None] & e_ok[None, :],
                              other=0.0, cache_modifier=".cg")
        logits = tl.where(e_ok[None, :], logits, float("-inf"))  # [BT, E_PAD]
        mx = tl.max(logits, axis=1)
        denom = tl.sum(tl.exp(logits - mx[:, None]), axis=1)  # [BT]
        offs_j = tl.arange(0, K_PAD)
        w_out = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        id_out = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best, idx = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
            prob = tl.exp(best - mx) / denom  # softmax of the chosen logit
            w_out = tl.where(offs_j[None, :] == j, prob[:, None], w_out)
            id_out = tl.where(offs_j[None, :] == j, idx[:, None].to(tl.int32), id_out)
            logits = tl.where(offs_e[None, :] == idx[:, None], float("-inf"), logits)
        if RENORM:
            w_out = w_out / tl.sum(w_out, axis=1)[:, None]
        if HAS_SHARED:
            g = tl.zeros([BLOCK_T], dtype=tl.float32)
            for ks in tl.static_range(SPLIT_K):
                part = tl.load(p_rows + ks * stride_pk + E, mask=t_ok[:, None], other=0.0, cache_modifier=".cg")
                g += tl.sum(part, axis=1)  # [BT]
            w_out = tl.where(offs_j[None, :] == TOP_K, tl.sigmoid(g)[:, None], w_out)
            id_out = tl.where(offs_j[None, :] == TOP_K, E, id_out)
        out = offs_t.to(tl.int64)[:, None] * K_OUT + offs_j[None, :]
        ok = t_ok[:, None] & (offs_j[None, :] < K_OUT)
        tl.store(weights_ptr + out, w_out, mask=ok)
        tl.store(ids_ptr + out, id_out, mask=ok)


def moe_router(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    top_k: int,
    renormalize: bool,
    w_shared_gate: torch.Tensor | None = None,
    *,
    force_triton: bool = False,
    config: RouterConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[T, H]``, w_gate ``[E, H]``, w_shared_gate ``[1, H]`` or None ->
    ``(topk_weights [T, k'] float32, topk_ids [T, k'] int32)``, ``k' = k + (w_shared_gate is not None)``.

    Slots ``0..k-1``: the top-k experts by softmax probability (renormalised when ``renormalize``);
    slot ``k``, if any: expert ``E`` (the folded shared expert) with weight ``sigmoid(x · w_shared_gate)``.
    On CUDA (or with ``force_triton``) one Triton launch, no host sync; else ``moe_router_ref``.
    ``config`` overrides ``pick_router_config``.
    """
    _check(x, w_gate, top_k, w_shared_gate)
    if not (x.is_cuda or force_triton) or triton is None:
        return moe_router_ref(x, w_gate, top_k, renormalize, w_shared_gate)
    T, H = x.shape
    E = w_gate.shape[0]
    has_shared = w_shared_gate is not None
    k_out = top_k + has_shared
    weights = _empty(T, k_out, dtype=torch.float32, device=x.device)
    ids = _empty(T, k_out, dtype=torch.int32, device=x.device)
    if T == 0:
        return weights, ids
    cfg = config or pick_router_config(T, E, H)
    token_blocks = triton.cdiv(T, cfg.block_t)
    if cfg.split and token_blocks > NUM_COUNTERS:
        raise ValueError(f"{token_blocks} token blocks of {cfg.block_t} exceed the {NUM_COUNTERS} arrival counters "
                         f"of the split router; use a larger block_t or split=False for T={T}")
    if not cfg.split and cfg.split_k != 1:
        raise ValueError(f"split=False needs split_k=1; got {cfg}")
    x, w_gate = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w_gate))
    w_sg = w_shared_gate.reshape(-1).contiguous() if has_shared else w_gate  # unread without a shared slot
    part = _empty(cfg.split_k, T, E + has_shared, dtype=torch.float32, device=x.device)
    parts = triton.cdiv(E, cfg.block_e) * cfg.split_k if cfg.split else 1
    _router_kernel[(token_blocks, parts)](
        x, w_gate, w_sg, part, counters(x.device, token_blocks) if cfg.split else part, weights, ids,
        T, x.stride(0), w_gate.stride(0), part.stride(0), part.stride(1),
        H=H, E=E, TOP_K=top_k, HAS_SHARED=has_shared, RENORM=renormalize, BLOCK_T=cfg.block_t,
        BLOCK_E=cfg.block_e, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, SPLIT=cfg.split,
        E_PAD=triton.next_power_of_2(E), K_PAD=triton.next_power_of_2(k_out),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_args(),
    )  # fmt: skip
    return weights, ids


# -- the two-launch alternative: logits from a GEMM (cuBLAS), then a per-token top-k kernel -------------
#
# ``moe_router`` fuses the gate GEMV into its launch; this path leaves the logits to one cuBLAS GEMM over
# ``[w_gate; w_shared_gate]`` and runs only the softmax / top-k / renormalise / shared-gate epilogue in
# Triton, one program per token over a 1-D row of E logits. Two launches instead of one, each simple;
# the logits are rounded to the model dtype first, as transformers' router does. Which is faster is a
# measurement (``--moe-router``).

if triton is not None:

    @triton.jit
    def _route_logits_kernel(
        logits_ptr, weights_ptr, ids_ptr, stride_t,
        E: tl.constexpr, TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, RENORM: tl.constexpr,
        E_PAD: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Grid (T,). logits row ``[E (+1)]``: column E is the shared gate's logit when HAS_SHARED."""
        pdl_gate(PDL)
        K_OUT: tl.constexpr = TOP_K + HAS_SHARED
        t = tl.program_id(0).to(tl.int64)
        row = logits_ptr + t * stride_t
        offs_e = tl.arange(0, E_PAD)
        logits = tl.load(row + offs_e, mask=offs_e < E, other=float("-inf")).to(tl.float32)
        mx = tl.max(logits, axis=0)
        denom = tl.sum(tl.exp(logits - mx), axis=0)
        offs_j = tl.arange(0, K_PAD)
        w_out = tl.zeros([K_PAD], dtype=tl.float32)
        id_out = tl.zeros([K_PAD], dtype=tl.int32)
        for j in tl.static_range(TOP_K):  # iterative max; the lowest index wins a tie
            best, idx = tl.max(logits, axis=0, return_indices=True, return_indices_tie_break_left=True)
            w_out = tl.where(offs_j == j, tl.exp(best - mx) / denom, w_out)
            id_out = tl.where(offs_j == j, idx.to(tl.int32), id_out)
            logits = tl.where(offs_e == idx, float("-inf"), logits)
        if RENORM:
            w_out = w_out / tl.sum(w_out, axis=0)
        if HAS_SHARED:
            g = tl.load(row + E).to(tl.float32)
            w_out = tl.where(offs_j == TOP_K, tl.sigmoid(g), w_out)
            id_out = tl.where(offs_j == TOP_K, E, id_out)
        ok = offs_j < K_OUT
        tl.store(weights_ptr + t * K_OUT + offs_j, w_out, mask=ok)
        tl.store(ids_ptr + t * K_OUT + offs_j, id_out, mask=ok)


def moe_route_logits(logits: torch.Tensor, top_k: int, renormalize: bool, has_shared: bool, *,
                     force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``[T, E (+1)]`` (the last column: the shared gate's logit when ``has_shared``) ->
    ``(topk_weights [T, k'] float32, topk_ids [T, k'] int32)``, the same slots as :func:`moe_router`.

    On CUDA (or with ``force_triton``) one Triton launch; else ``moe_route`` plus the shared slot.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E (+1)]; got {tuple(logits.shape)}")
    T, E = logits.shape[0], logits.shape[1] - has_shared
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}]; got {top_k}")
    if not (logits.is_cuda or force_triton) or triton is None:
        weights, ids = moe_route(logits[:, :E], top_k, renormalize)
        if not has_shared:
            return weights, ids
        shared_w = torch.sigmoid(logits[:, E:].float())
        return torch.cat([weights, shared_w], 1), torch.cat([ids, torch.full_like(ids[:, :1], E)], 1)
    k_out = top_k + has_shared
    weights = _empty(T, k_out, dtype=torch.float32, device=logits.device)
    ids = _empty(T, k_out, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    _route_logits_kernel[(T,)](
        logits, weights, ids, logits.stride(0),
        E=E, TOP_K=top_k, HAS_SHARED=has_shared, RENORM=renormalize,
        E_PAD=triton.next_power_of_2(E), K_PAD=triton.next_power_of_2(k_out),
        num_warps=4 if E > 128 else 1, **launch_args(),
    )  # fmt: skip
    return weights, ids
