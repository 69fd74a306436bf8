"""GDN state slots: per GDN layer, a conv ring ``[slots, W, conv_dim]`` and a recurrent state
``[slots, Hv, Dk, Dv]``; one slot per running request, for every layer at once.

Each slot is held by exactly one running request: taken at admission, returned at finish, abort or
preemption. One extra slot (index ``num_slots``) is a scratch slot that padded rows of a CUDA-graph
batch read and write, so kernels need no "is this row real" branch.
"""

from __future__ import annotations

import torch

from deltaserve.models.config import ModelConfig


def state_bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype, state_dtype: torch.dtype, tp: int = 1) -> int:
    conv = cfg.linear_conv_kernel_dim * cfg.conv_dim // tp * dtype.itemsize
    ssm = cfg.linear_num_value_heads // tp * cfg.linear_key_head_dim * cfg.linear_value_head_dim * state_dtype.itemsize
    return cfg.num_gdn_layers * (conv + ssm)


class StateCache:
    def __init__(self, gdn_layers: list, num_slots: int, dtype: torch.dtype, state_dtype: torch.dtype,
                 device: torch.device):
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.conv_states, self.ssm_states = [], []
        for layer in gdn_layers:
            W = layer.conv1d.weight.shape[-1]
            conv = torch.zeros(num_slots + 1, W, layer.conv_dim, dtype=dtype, device=device)
            ssm = torch.zeros(num_slots + 1, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim,
                              dtype=state_dtype, device=device)
            layer.conv_state, layer.ssm_state = conv, ssm
            self.conv_states.append(conv)
            self.ssm_states.append(ssm)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise RuntimeError("no free GDN state slot (the scheduler admits only while one is free)")
        return self._free.pop()

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, f"double free of state slot {slot}"
        self._free.append(slot)
