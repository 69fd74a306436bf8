"""The memory roofline of a decode step: the bytes it must move, and the bandwidth of this card.

A decode step for N sequences must at least stream every weight it uses once (the routed experts
only where they were touched: ``E * (1 - (1 - k/E)^N)`` per MoE layer under uniform routing), read
and write each sequence's GDN state, and read each sequence's KV cache. Bytes over the measured
copy bandwidth (read + write of a large device-to-device copy) bound the step time from below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.models.config import ModelConfig


@dataclass
class StepBytes:
    weights: float  # dense weights + touched experts + lm_head
    state: float  # GDN conv + recurrent state, read and written
    kv: float  # KV cache read (and the new token's K/V written)

    @property
    def total(self) -> float:
        return self.weights + self.state + self.kv


def expected_experts_touched(num_experts: int, top_k: int, n_tokens: int) -> float:
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** n_tokens) if num_experts else 0.0


def param_counts(cfg: ModelConfig) -> dict[str, float]:
    """Parameter counts per class (full model, TP=1), without building it."""
    H, D = cfg.hidden_size, cfg.head_dim
    gdn = (H * (2 * cfg.key_dim + 2 * cfg.value_dim + 2 * cfg.linear_num_value_heads)
           + cfg.conv_dim * cfg.linear_conv_kernel_dim + cfg.value_dim * H + 2 * cfg.linear_num_value_heads
           + cfg.linear_value_head_dim)
    attn = (H * cfg.num_attention_heads * D * 2 + 2 * H * cfg.num_key_value_heads * D
            + cfg.num_attention_heads * D * H + 2 * D)
    dense_mlp = 3 * H * cfg.intermediate_size
    expert = 3 * H * cfg.moe_intermediate_size
    moe_fixed = cfg.num_experts * H + 3 * H * cfg.shared_expert_intermediate_size + H
    counts = {"gdn": cfg.num_gdn_layers * gdn, "attention": cfg.num_attention_layers * attn,
              "dense_mlp": cfg.mlp_types.count("dense") * dense_mlp,
              "moe_fixed": cfg.mlp_types.count("moe") * moe_fixed,
              "experts": cfg.mlp_types.count("moe") * cfg.num_experts * expert,
              "norms": (2 * cfg.num_hidden_layers + 1) * H,
              "embed": cfg.vocab_size * H, "lm_head": 0 if cfg.tie_word_embeddings else cfg.vocab_size * H}
    return counts


def decode_step_bytes(cfg: ModelConfig, n: int, context_len: int, dtype_bytes: int = 2, state_bytes: int = 4,
                      tp: int = 1) -> StepBytes:
    """Bytes one decode step of ``n`` sequences at ``context_len`` tokens must move (per TP rank)."""
    c = param_counts(cfg)
    touched = expected_experts_touched(cfg.num_experts, cfg.num_experts_per_tok, n)
    expert_params = cfg.mlp_types.count("moe") * touched * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    head = cfg.vocab_size * cfg.hidden_size  # tied or not, the head streams the whole matrix
    streamed = c["gdn"] + c["attention"] + c["dense_mlp"] + c["moe_fixed"] + c["norms"] + expert_params + head
    weights = streamed * dtype_bytes / tp + n * cfg.hidden_size * dtype_bytes  # + the N embedding rows
    ssm = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * state_bytes
    conv = cfg.conv_dim * cfg.linear_conv_kernel_dim * dtype_bytes
    state = cfg.num_gdn_layers * n * (2 * ssm + conv + cfg.conv_dim * dtype_bytes) / tp
    kv_token = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    kv = cfg.num_attention_layers * n * (context_len + 1) * kv_token / tp
    return StepBytes(weights, state, kv)


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 2 * 2**30, iters: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 256 * 2**20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        t = sorted(times)[len(times) // 2]
    else:
        import time

        times = []
        for _ in range(max(3, iters // 3)):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
    return 2 * src.numel() * src.element_size() / t


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"
