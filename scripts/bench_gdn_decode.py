"""Our fused GDN decode kernel against fla-core's fused_recurrent on the same shapes (GPU only).

One decode token per sequence, states in slot pools, as in serving. Three ways to do the same step:

* ``ours``: ``gdn_decode_fused`` -- conv update + SiLU + gating + q/k L2 norm + delta rule, one launch,
  conv and recurrent states read and written in place through the slot indices;
* ``fla pipeline``: our conv-update kernel, then fla's ``fused_recurrent_gated_delta_rule`` (gating,
  beta sigmoid and q/k L2 norm inside its kernel) on states gathered from the pool, then the final
  states scattered back -- what an engine built on fla's kernel has to do without slot indexing;
* ``fla kernel only``: fla's kernel alone on pre-gathered states (its own speed, not a usable step).

Each timed graph steps several disjoint slot sets (>= 256 MiB of state) so states come from HBM.
µs per step; the floor is the state bytes (read + write, fp32) at the measured copy bandwidth.

    python scripts/bench_gdn_decode.py [--batch 1,4,16,64] [--output gdn.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from deltaserve.bench.roofline import measure_copy_bandwidth
from deltaserve.layers.inproj_tune import time_graph
from deltaserve.ops.conv1d_triton import causal_conv1d_update
from deltaserve.ops.gdn_decode import gdn_decode_fused

SHAPES = {"35B-A3B / 9B (Hk 16, Hv 32)": (16, 32), "122B-A10B (Hk 16, Hv 64)": (16, 64)}
DK = DV = 128
W = 4


def main() -> None:
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="1,4,16,64")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    dev, act = "cuda", torch.bfloat16
    bw = measure_copy_bandwidth(torch.device(dev))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; fp32 state, bf16 activations")
    rows = []
    for name, (hk, hv) in SHAPES.items():
        key_dim, conv_dim = hk * DK, 2 * hk * DK + hv * DV
        for B in (int(v) for v in args.batch.split(",")):
            state_bytes = B * hv * DK * DV * 4
            n_sets = min(max(-(-(256 << 20) // state_bytes), 1), 64)
            S = B * n_sets
            x = torch.randn(B, conv_dim, device=dev, dtype=act)
            a, b = torch.randn(B, hv, device=dev, dtype=act), torch.randn(B, hv, device=dev, dtype=act)
            weight = torch.randn(conv_dim, W, device=dev, dtype=act) * 0.5
            conv = torch.zeros(S, W, conv_dim, device=dev, dtype=act)
            ssm = torch.randn(S, hv, DK, DV, device=dev, dtype=torch.float32) * 0.01
            sets = torch.arange(S, device=dev, dtype=torch.int32).view(n_sets, B)
            pos = torch.full((B,), 7, device=dev, dtype=torch.int64)
            A_log = torch.zeros(hv, device=dev, dtype=torch.float32)
            dt_bias = torch.zeros(hv, device=dev, dtype=torch.float32)
            gathered = ssm[: B].clone()

            def ours():
                for slots in sets:
                    gdn_decode_fused(x, a, b, weight, conv, ssm, slots, pos, A_log, dt_bias, hk, DK, DV)

            def fla_step(slots, init):
                y = causal_conv1d_update(x, weight, conv, slots, pos)
                q, k, v = y.split([key_dim, key_dim, hv * DV], dim=-1)
                o, final = fused_recurrent_gated_delta_rule(
                    q.view(B, 1, hk, DK), k.view(B, 1, hk, DK), v.view(B, 1, hv, DV), g=a.view(B, 1, hv),
                    beta=b.view(B, 1, hv), initial_state=init, output_final_state=True,
                    use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                    use_beta_sigmoid_in_kernel=True)
                return o, final

            def fla_pipeline():
                for slots in sets:
                    idx = slots.long()
                    _, final = fla_step(slots, ssm.index_select(0, idx))
                    ssm.index_copy_(0, idx, final)

            def fla_kernel_only():
                for _ in range(n_sets):
                    fused_recurrent_gated_delta_rule(
                        x[:, :key_dim].reshape(B, 1, hk, DK), x[:, key_dim: 2 * key_dim].reshape(B, 1, hk, DK),
                        x[:, 2 * key_dim:].reshape(B, 1, hv, DV), g=a.view(B, 1, hv), beta=b.view(B, 1, hv),
                        initial_state=gathered, output_final_state=True, use_qk_l2norm_in_kernel=True,
                        use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)

            # Same step, same result: one step each way from identical states.
            slots0 = sets[0]
            conv0, ssm0 = conv.clone(), ssm.clone()
            o_ours = gdn_decode_fused(x, a, b, weight, conv, ssm, slots0, pos, A_log, dt_bias, hk, DK, DV)
            conv.copy_(conv0)
            o_fla, final = fla_step(slots0, ssm0.index_select(0, slots0.long()))
            s_ours = ssm.index_select(0, slots0.long())
            o_err = ((o_ours.float() - o_fla.view_as(o_ours).float()).norm() / o_fla.float().norm()).item()
            s_err = ((s_ours - final.float()).norm() / final.float().norm()).item()
            del conv0, ssm0
            t = {k: time_graph(fn, n_sets) for k, fn in
                 (("ours", ours), ("fla_pipeline", fla_pipeline), ("fla_kernel_only", fla_kernel_only))}
            floor = 2 * state_bytes / bw * 1e6
            rows.append({"shape": name, "B": B, "floor_us": floor, **t, "o_rel_err": o_err, "state_rel_err": s_err})
            print(f"{name:<28} B={B:<3} floor {floor:7.2f}  ours {t['ours']:7.2f} ({t['ours'] / floor:.2f}x)  "
                  f"fla pipeline {t['fla_pipeline']:7.2f}  fla kernel only {t['fla_kernel_only']:7.2f}  "
                  f"pipeline/ours {t['fla_pipeline'] / t['ours']:.2f}  (ours vs fla: o {o_err:.1e}, state {s_err:.1e})")
            del conv, ssm
            torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
