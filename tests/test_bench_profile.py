"""`bench profile` (CPU smoke test): every profiled op lands in a class and the JSON is complete."""

from __future__ import annotations

import json

from deltaserve.bench.profile import classify
from deltaserve.cli import main


def test_classes_of_known_kernel_names():
    assert classify("deltaserve::gdn_core") == "gdn (conv + delta rule)"
    assert classify("_gdn_decode_fused_kernel") == "gdn (conv + delta rule)"
    assert classify("deltaserve::gdn_in_proj") == "in_proj (dual)"
    assert classify("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm (linear layers)"
    assert classify("_paged_decode_kernel") == "attention"
    assert classify("_w13_silu_kernel") == "moe experts"
    assert classify("_gemv_w2_kernel") == "moe experts"
    assert classify("deltaserve::moe_experts") == "moe experts"
    assert classify("_router_kernel") == "routing + sampling"
    assert classify("deltaserve::moe_router") == "routing + sampling"
    assert classify("_rms_norm_kernel") == "norms + activation"
    assert classify("void at::native::vectorized_elementwise_kernel<4, ...>") == "elementwise + copies"


def test_profile_runs_on_the_demo_model(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["bench", "profile", "--batch", "2", "--steps", "2", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    classes = {r["class"] for r in data["rows"]}
    assert {"gemm (linear layers)", "gdn (conv + delta rule)", "attention", "norms + activation"} <= classes
    assert data["kernel_us_per_step"] > 0
    assert "kernels/step" in capsys.readouterr().out


def test_prefill_profile_on_the_demo_model(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    assert main(["bench", "profile", "--prefill-tokens", "30", "--steps", "2", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["prefill_tokens"] == 30 and data["wall_ms_per_step"] > 0 and data["kernel_us_per_step"] > 0
    assert all(r["bytes"] is None for r in data["rows"])
    assert "prefill steps of one fresh 30-token prompt" in capsys.readouterr().out
