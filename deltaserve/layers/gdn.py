"""The Gated DeltaNet mixer (``linear_attn.*``) of Qwen3.5 / Qwen3-Next.

in_proj -> causal conv1d over [q|k|v] (+SiLU) -> gated delta rule -> RMSNormGated(o, z) -> out_proj.
Everything that touches per-sequence state runs inside one custom op, ``deltaserve::gdn_core``, which
reads the batch from the forward context and updates the state slots in place.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaserve.distributed import divide, tp_rank, tp_size
from deltaserve.forward_context import get_batch
from deltaserve.layers.inproj import InProjPlan, project
from deltaserve.layers.layer_ref import LayerRef, define_layer_op, layer_arg, layer_op
from deltaserve.layers.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    check_shape,
    copy_checked,
    rank_rows,
)
from deltaserve.layers.norm import RMSNormGated
from deltaserve.models.config import ModelConfig
from deltaserve.ops.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from deltaserve.ops.gated_delta_rule import gdn_decode_ref
from deltaserve.ops.gdn_prefill import gdn_prefill_ref

# Prefills whose longest sequence has at most this many tokens run the recurrent kernel
# (ops/gdn_prefill_recurrent.py) instead of fla-core's chunked one. fla's path is ~8 launches per layer,
# each behind Python wrappers and autotuner look-ups: ~2.3 ms of host time per GDN layer, against a few
# microseconds of GPU time for a recurrent pass over <= 64 tokens (one launch, the state in registers).
# The recurrent kernel's token loop is serial, so its GPU time grows with the longest sequence while
# the chunked kernels' work is tensor-core matmuls; 64 is fla's chunk size (at or below it every
# sequence is a single chunk). The crossover has not been measured: 64 keeps the recurrent pass short.
RECURRENT_PREFILL_MAX_TOKENS = 64


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, plan: InProjPlan):
        super().__init__()
        tp = tp_size()
        self.num_k_heads = divide(cfg.linear_num_key_heads, tp, "linear_num_key_heads")
        self.num_v_heads = divide(cfg.linear_num_value_heads, tp, "linear_num_value_heads")
        self.head_k_dim, self.head_v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim  # per rank
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.qkvz_size = self.conv_dim + self.value_dim
        self.plan = plan
        H, kd, vd, hv = cfg.hidden_size, cfg.key_dim, cfg.value_dim, cfg.linear_num_value_heads
        # One weight for all three strategies: shards [q, k, v, z, b, a].
        self.in_proj = MergedColumnParallelLinear(H, [kd, kd, vd, vd, hv, hv], "GDN key/value heads")
        self.in_proj.weight.weight_loader = self.load_in_proj
        self.conv1d = ConvWeight([kd, kd, vd], cfg.linear_conv_kernel_dim)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads), requires_grad=False)
        for p in (self.dt_bias, self.A_log):
            p.weight_loader = _head_loader(hv)
        self.norm = RMSNormGated(self.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = RowParallelLinear(cfg.value_dim, H, what="GDN value_dim", skinny=True)
        sizes = {"qkvz": self.qkvz_size, "ba": 2 * self.num_v_heads, "v_heads": self.num_v_heads,
                 "v_dim": self.head_v_dim}
        self.layer = layer_arg(self, prefix, sizes)
        self.conv_state: torch.Tensor | None = None  # [slots, W, conv_dim], bound by the state cache
        self.ssm_state: torch.Tensor | None = None  # [slots, Hv, Dk, Dv]
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``, already normalised -> ``[T, H]``."""
        T = x.shape[0]
        return self._mix(*project(x, self.in_proj.weight, self.qkvz_size, self.plan.choose(T), self.layer))

    def _mix(self, qkvz: torch.Tensor, ba: torch.Tensor) -> torch.Tensor:
        T = qkvz.shape[0]
        mixed_qkv, z = qkvz[:, : self.conv_dim], qkvz[:, self.conv_dim :]  # [T, conv_dim], [T, v]
        b, a = ba[:, : self.num_v_heads], ba[:, self.num_v_heads :]  # [T, Hv] each
        o = layer_op("gdn_core", self.layer)(mixed_qkv, b, a, self.layer)  # [T, Hv, Dv]
        o = self.norm(o, z.reshape(T, self.num_v_heads, self.head_v_dim))
        return self.out_proj(o.reshape(T, self.value_dim))

    def load_in_proj(self, param, loaded, shard, name: str = "") -> None:
        """Qwen3.5's separate tensors go through the merged loader; Qwen3-Next's interleaved ones
        (``in_proj_qkvz``: per key head ``[q Dk | k Dk | v r*Dv | z r*Dv]``, ``in_proj_ba``: per key
        head ``[b r | a r]``, ``r = Hv / Hk``) are de-interleaved here into the same shards -- so
        Qwen3-Next runs the fused strategy too. A rank reads only its own key-head groups.
        """
        if not isinstance(shard, str):
            return self.in_proj.weight_loader(param, loaded, shard, name)
        r = self.num_v_heads // self.num_k_heads
        if shard == "qkvz_interleaved":
            parts, first = [self.head_k_dim, self.head_k_dim, r * self.head_v_dim, r * self.head_v_dim], 0
        else:
            parts, first = [r, r], 4
        group, H = sum(parts), param.shape[1]
        total = group * self.num_k_heads * tp_size()
        check_shape(name, loaded, (total, H))
        g0 = tp_rank() * self.num_k_heads
        rows = loaded[g0 * group : (g0 + self.num_k_heads) * group].view(self.num_k_heads, group, H)
        ip = self.in_proj
        for i, chunk in enumerate(torch.split(rows, parts, dim=1)):
            s = first + i
            copy_checked(param.data[ip.offsets[s] : ip.offsets[s] + ip.rank_sizes[s]], chunk.reshape(-1, H), name)

    # -- helpers used by the in_proj op ----------------------------------------------------------
    def inproj_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.in_proj.weight
        return w[: self.qkvz_size], w[self.qkvz_size :]

    def inproj_events(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if self._events is None:
            self._events = (torch.cuda.Event(), torch.cuda.Event())
        return self._events


class ConvWeight(nn.Module):
    """``conv1d.weight [conv_dim, 1, W]``; on TP ranks the q, k and v channel blocks split separately."""

    def __init__(self, full_sizes: list[int], width: int):
        super().__init__()
        self.full_sizes = full_sizes
        self.rank_sizes = [divide(s, tp_size(), "GDN conv channels") for s in full_sizes]
        self.weight = nn.Parameter(torch.empty(sum(self.rank_sizes), 1, width), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard=None, name=""):
        check_shape(name, loaded, (sum(self.full_sizes), 1, param.shape[2]))
        row, out = 0, 0
        for full, mine in zip(self.full_sizes, self.rank_sizes):
            copy_checked(param.data[out : out + mine], rank_rows(loaded, full, name, start=row), name)
            row, out = row + full, out + mine


def _head_loader(total: int):
    def load(param, loaded, shard=None, name=""):
        check_shape(name, loaded, (total,))
        copy_checked(param.data, rank_rows(loaded, total, name), name)

    return load


# -- the state-touching core ------------------------------------------------------------------------


def _gdn_core(mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, ref: LayerRef) -> torch.Tensor:
    """mixed_qkv ``[T, conv_dim]``, b/a ``[T, Hv]`` -> o ``[T, Hv, Dv]``; state slots updated in place."""
    gdn: GatedDeltaNet = ref.module
    meta = get_batch()
    T, nd = mixed_qkv.shape[0], meta.num_decodes
    # mixed_qkv is a row-strided view of the in_proj output: the kernels read it in place.
    parts = []
    if nd:
        parts.append(_decode(gdn, mixed_qkv[:nd], b[:nd], a[:nd], meta.state_slots[:nd], meta.positions[:nd]))
    if T > nd:
        parts.append(_prefill(gdn, mixed_qkv[nd:], b[nd:], a[nd:], meta.prefill))
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # no copy unless the step mixes both


def _gdn_core_fake(mixed_qkv, b, a, ref: LayerRef) -> torch.Tensor:
    return mixed_qkv.new_empty(mixed_qkv.shape[0], ref.sizes["v_heads"], ref.sizes["v_dim"])


define_layer_op("gdn_core", "Tensor mixed_qkv, Tensor b, Tensor a", "Tensor", _gdn_core, _gdn_core_fake)


def _split_heads(gdn: GatedDeltaNet, qkv: torch.Tensor):
    q, k, v = torch.split(qkv, [gdn.key_dim, gdn.key_dim, gdn.value_dim], dim=-1)
    T = qkv.shape[0]
    return (q.reshape(T, gdn.num_k_heads, gdn.head_k_dim), k.reshape(T, gdn.num_k_heads, gdn.head_k_dim),
            v.reshape(T, gdn.num_v_heads, gdn.head_v_dim))


def _decode(gdn: GatedDeltaNet, qkv, b, a, slots, positions) -> torch.Tensor:
    w = gdn.conv1d.weight.view(gdn.conv_dim, -1)
    if qkv.is_cuda:
        from deltaserve.ops.gdn_decode import gdn_decode_fused

        return gdn_decode_fused(qkv, a, b, w, gdn.conv_state, gdn.ssm_state, slots, positions, gdn.A_log,
                                gdn.dt_bias, gdn.num_k_heads, gdn.head_k_dim, gdn.head_v_dim)
    x = causal_conv1d_update_ref(qkv, w, gdn.conv_state, slots, positions)
    q, k, v = _split_heads(gdn, x)
    return gdn_decode_ref(q, k, v, a, b, gdn.A_log, gdn.dt_bias, gdn.ssm_state, slots)


def _prefill(gdn: GatedDeltaNet, qkv, b, a, pv) -> torch.Tensor:
    w = gdn.conv1d.weight.view(gdn.conv_dim, -1)
    if qkv.is_cuda:
        return _prefill_kernels(gdn, w, qkv, b, a, pv)
    x = causal_conv1d_ref(qkv, w, pv.query_start_loc_cpu, pv.context_lens_cpu, gdn.conv_state, pv.state_slots)
    q, k, v = _split_heads(gdn, x)
    return gdn_prefill_ref(q, k, v, a, b, gdn.A_log, gdn.dt_bias, gdn.ssm_state, pv.state_slots,
                           pv.has_initial_state, pv.query_start_loc_cpu)


def use_recurrent_prefill(pv) -> bool:
    """Whether this step's prefills take the one-launch recurrent kernel (decided on host metadata)."""
    return pv.max_query_len <= RECURRENT_PREFILL_MAX_TOKENS


def _prefill_kernels(gdn: GatedDeltaNet, w, qkv, b, a, pv) -> torch.Tensor:
    """The GPU path: Triton conv, then the recurrent kernel for short prefills, fla's chunked one otherwise."""
    from deltaserve.ops.conv1d_triton import causal_conv1d_prefill

    x = causal_conv1d_prefill(qkv, w, pv.query_start_loc, pv.context_lens, gdn.conv_state, pv.state_slots)
    q, k, v = _split_heads(gdn, x)
    args = (q, k, v, a, b, gdn.A_log, gdn.dt_bias, gdn.ssm_state, pv.state_slots, pv.has_initial_state,
            pv.cu_seqlens_long)
    if use_recurrent_prefill(pv):
        from deltaserve.ops.gdn_prefill_recurrent import gdn_prefill_recurrent

        return gdn_prefill_recurrent(*args)
    from deltaserve.ops.gdn_prefill import gdn_prefill

    return gdn_prefill(*args, chunk_indices=pv.chunk_indices)
