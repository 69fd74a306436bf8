"""Qwen3-Next and Qwen3.5 (dense and MoE) text models with checkpoint names.

One implementation serves all five HF architectures: they differ only in the MLP kind per layer and
in how the GDN input projection is stored, which :meth:`Qwen3NextForCausalLM.map_weight` resolves.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from deltaserve.layers.attention import GatedAttention
from deltaserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from deltaserve.layers.gdn import GatedDeltaNet
from deltaserve.layers.inproj import InProjPlan
from deltaserve.layers.mlp import SwiGLU
from deltaserve.layers.moe import SparseMoE, folds_shared_expert
from deltaserve.layers.norm import RMSNorm
from deltaserve.models.config import ModelConfig


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, plan: InProjPlan):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.is_gdn = cfg.layer_types[idx] == "linear_attention"
        if self.is_gdn:
            self.linear_attn = GatedDeltaNet(cfg, f"model.layers.{idx}.linear_attn", plan)
        else:
            self.self_attn = GatedAttention(cfg, f"model.layers.{idx}.self_attn")
        self.mlp = SparseMoE(cfg) if cfg.mlp_types[idx] == "moe" else SwiGLU(H, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's output, ``residual`` the stream before it (None at layer 0).

        The residual adds are fused into the next norm: ``x + residual`` is formed by the norm kernel.
        """
        h, residual = self.input_layernorm.with_residual(x, residual)
        h = self.linear_attn(h) if self.is_gdn else self.self_attn(h, positions)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: InProjPlan):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, plan) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        for layer in self.layers:
            x, residual = layer(x, residual, positions)
        return self.norm(x, residual)[0]


_SKIP = re.compile(r"^(mtp\.|model\.visual\.|visual\.|model\.mtp\.)")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_SHARED_EXPERT = re.compile(r"^(.*\.mlp)\.shared_expert\.(gate|up|down)_proj\.weight$")


def _expert_param(experts: str, e: int, kind: str) -> tuple[str, tuple[int, str]]:
    """One expert's gate/up/down tensor -> its slice (expert e) of the stacked parameter."""
    return f"{experts}.{'down_proj' if kind == 'down' else 'gate_up_proj'}", (e, kind)


class Qwen3NextForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> hidden [T, H]``; ``compute_logits(hidden) -> [N, V]``."""

    # checkpoint suffix -> (parameter suffix, shard). Shards of the GDN in_proj are [q, k, v, z, b, a].
    packed_modules_mapping = {
        "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", "q"),
        "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", "k"),
        "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", "v"),
        "linear_attn.in_proj_qkv.weight": ("linear_attn.in_proj.weight", (0, 1, 2)),
        "linear_attn.in_proj_z.weight": ("linear_attn.in_proj.weight", 3),
        "linear_attn.in_proj_b.weight": ("linear_attn.in_proj.weight", 4),
        "linear_attn.in_proj_a.weight": ("linear_attn.in_proj.weight", 5),
        "linear_attn.in_proj_qkvz.weight": ("linear_attn.in_proj.weight", "qkvz_interleaved"),
        "linear_attn.in_proj_ba.weight": ("linear_attn.in_proj.weight", "ba_interleaved"),
        "gate_proj.weight": ("gate_up_proj.weight", 0),
        "up_proj.weight": ("gate_up_proj.weight", 1),
    }

    def __init__(self, cfg: ModelConfig, plan: InProjPlan | None = None):
        super().__init__()
        self.config = cfg
        self.plan = plan or InProjPlan("fused")
        self.model = TextModel(cfg, self.plan)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def map_weight(self, name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (parameter name, shard), or None for weights the text model skips."""
        if _SKIP.match(name):
            return None
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model.") :]
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # tied: the embedding is the head
        if m := _EXPERT.match(name):
            return _expert_param(m.group(1), int(m.group(2)), m.group(3))
        if (m := _SHARED_EXPERT.match(name)) and folds_shared_expert(self.config):  # stored as expert E
            return _expert_param(m.group(1) + ".experts", self.config.num_experts, m.group(2))
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            return name, None
        for suffix, (target, shard) in self.packed_modules_mapping.items():
            if name.endswith("." + suffix):
                return name[: -len(suffix)] + target, shard
        return name, None

    def set_moe_router(self, impl: str) -> None:
        """Every sparse-MoE block routes with ``impl`` ("kernel" or "gemm"; see ``SparseMoE.set_router``)."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.set_router(impl)

    def set_skinny(self, out_proj: bool, dense: bool = False) -> None:
        """Which projections run few-token batches (<= SKINNY_MAX_TOKENS) on our skinny GEMM instead of
        cuBLAS: ``out_proj`` the GDN out_proj and attention o_proj; ``dense`` the dense MLPs' gate_up and
        down_proj and the MoE router GEMM (see ``SparseMoE.skinny_router``). The attention qkv_proj stays
        on cuBLAS: 11.5 against our 12.3-12.9 us on the 35B-A3B shape (H200, docs/perf/2026-11-28e.md)."""
        for layer in self.model.layers:
            (layer.linear_attn.out_proj if layer.is_gdn else layer.self_attn.o_proj).skinny = out_proj
            for mlp in layer.mlp.modules():
                if isinstance(mlp, SwiGLU):  # the dense MLP, or an MoE block's unfolded shared expert
                    mlp.gate_up_proj.skinny = mlp.down_proj.skinny = dense
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.skinny_router = dense

    def gdn_layers(self) -> list[GatedDeltaNet]:
        return [layer.linear_attn for layer in self.model.layers if layer.is_gdn]

    def attention_layers(self) -> list[GatedAttention]:
        return [layer.self_attn for layer in self.model.layers if not layer.is_gdn]
