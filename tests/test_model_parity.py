"""Our model vs HF transformers (fp32, CPU), on checkpoints written by ``save_pretrained``."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from model_utils import TINY_MOE, TINY_TEXT, Runner, randomize_

from deltaserve.layers.inproj import InProjPlan
from deltaserve.models.loader import load_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _text(**over):
    return {**TINY_TEXT, **over}


def build_hf(kind: str, **over):
    """kind: qwen3_5 | qwen3_5_moe | qwen3_next | qwen3_5_vl (ConditionalGeneration with vision weights)."""
    if kind == "qwen3_5":
        return tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**_text(intermediate_size=128, **over)))
    if kind == "qwen3_5_moe":
        return tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**_text(**TINY_MOE, **over)))
    if kind == "qwen3_next":  # a shared expert wider than the routed ones: kept as a separate SwiGLU
        moe = {**TINY_MOE, "shared_expert_intermediate_size": 48}
        cfg = tf.Qwen3NextConfig(**_text(**moe, intermediate_size=96, **over))
        return tf.Qwen3NextForCausalLM(cfg)
    if kind == "qwen3_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=4, temporal_patch_size=2, num_position_embeddings=16)
        cfg = tf.Qwen3_5Config(text_config=_text(intermediate_size=128, **over), vision_config=vision,
                               tie_word_embeddings=True)
        return tf.Qwen3_5ForConditionalGeneration(cfg)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved checkpoint per architecture, each sharded by a small max_shard_size."""
    out = {}
    for kind in ("qwen3_5", "qwen3_5_moe", "qwen3_next", "qwen3_5_vl"):
        torch.manual_seed(0)
        hf = build_hf(kind).eval()
        randomize_(hf)
        if kind == "qwen3_5_vl":
            hf.tie_weights()
        d = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(d, max_shard_size="150KB")
        out[kind] = (hf, d)
    return out


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0].float()


KINDS = ["qwen3_5", "qwen3_5_moe", "qwen3_next", "qwen3_5_vl"]


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_logits_match_transformers(checkpoints, kind):
    hf, d = checkpoints[kind]
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    model = load_model(d, dtype=torch.float32)
    _, ours = Runner(model).prefill(ids)
    assert rel(ours, _hf_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_decode_with_state_equals_full_forward(checkpoints, kind):
    """Prefill 9 tokens, then decode one at a time through the state slots == one full forward."""
    _, d = checkpoints[kind]
    ids = torch.randint(0, 96, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    runner = Runner(load_model(d, dtype=torch.float32))
    _, full = runner.prefill(ids)
    seq, first = runner.prefill(ids[:9])
    steps = [runner.step([(seq, [t])]) for t in ids[9:]]
    stepped = torch.cat([first, *steps])
    assert rel(stepped, full) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_continuation_matches_transformers(checkpoints, kind):
    hf, d = checkpoints[kind]
    prompt = [5, 17, 33, 2, 90, 41, 7]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    runner = Runner(load_model(d, dtype=torch.float32))
    seq, logits = runner.prefill(prompt)
    ours = [int(logits[-1].argmax())]
    while len(ours) < 32:
        ours.append(int(runner.step([(seq, [ours[-1]])])[-1].argmax()))
    assert ours == hf_out


@pytest.mark.parametrize("ratio", [1, 3])
def test_head_ratios(tmp_path, ratio):
    torch.manual_seed(0)
    hf = build_hf("qwen3_5", linear_num_key_heads=2, linear_num_value_heads=2 * ratio).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    ids = list(range(3, 40))
    _, ours = Runner(load_model(tmp_path, dtype=torch.float32)).prefill(ids)
    assert rel(ours, _hf_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen3_next"])
def test_inproj_strategies_agree(tmp_path, kind):
    """serial / dual / fused: same logits within 1e-6 relative (fp32).

    The strategies share one weight, but a GEMM of a different width may sum in a different order
    (on the CPU the 2*Hv-wide ``ba`` GEMM takes another kernel: ~4e-7 relative). This model keeps
    transformers' own initialisation, so that rounding noise is not amplified as it is by the
    deliberately large random weights of the parity checkpoints.
    """
    torch.manual_seed(0)
    build_hf(kind).save_pretrained(tmp_path)
    d = tmp_path
    ids = list(range(1, 90))
    outs = {}
    for strategy in ("serial", "dual", "fused"):
        model = load_model(d, dtype=torch.float32, plan=InProjPlan(strategy))
        _, outs[strategy] = Runner(model).prefill(ids)
    assert rel(outs["serial"], outs["fused"]) <= 1e-6
    assert rel(outs["dual"], outs["fused"]) <= 1e-6


def test_dual_aux_stream_is_made_once(monkeypatch):
    """The dual path's CUDA-only helper, reached on the CPU with a stand-in stream class (without CUDA
    ``dual`` computes serially and never calls it): one process-wide stream, made on first use."""
    import deltaserve.layers.inproj as inproj

    made = []

    class FakeStream:
        def __init__(self):
            made.append(self)

    monkeypatch.setattr(inproj, "_aux_stream", None)  # raises if the module lost its global
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    assert inproj.aux_stream() is inproj.aux_stream() is made[0] and len(made) == 1


def test_stacked_experts_load_like_per_expert(checkpoints, tmp_path):
    """Rewrite the MoE checkpoint in the released Qwen3.5-MoE layout (3-D gate_up_proj / down_proj)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    hf, d = checkpoints["qwen3_5_moe"]
    tensors = {}
    for f in sorted(d.glob("*.safetensors")):
        tensors.update(load_file(f))
    stacked, E = {}, TINY_MOE["num_experts"]
    for name in list(tensors):
        if ".experts.0.gate_proj" in name:
            base = name.split(".experts.0.")[0] + ".experts"
            gate = [tensors.pop(f"{base}.{e}.gate_proj.weight") for e in range(E)]
            up = [tensors.pop(f"{base}.{e}.up_proj.weight") for e in range(E)]
            down = [tensors.pop(f"{base}.{e}.down_proj.weight") for e in range(E)]
            stacked[f"{base}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
            stacked[f"{base}.down_proj"] = torch.stack(down)
    tensors.update(stacked)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(d / "config.json", tmp_path / "config.json")
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3_5MoeForCausalLM"]
    ids = list(range(2, 30))
    _, per_expert = Runner(load_model(d, dtype=torch.float32)).prefill(ids)
    _, stacked_out = Runner(load_model(tmp_path, dtype=torch.float32)).prefill(ids)
    assert torch.equal(per_expert, stacked_out)


def test_shared_expert_is_stored_once_as_expert_e(checkpoints):
    """As wide as a routed expert: the shared expert is expert E of the stacked weights, with no copy."""
    hf, d = checkpoints["qwen3_5_moe"]
    moe = load_model(d, dtype=torch.float32).model.layers[1].mlp
    E = TINY_MOE["num_experts"]
    assert not hasattr(moe, "shared_expert")
    assert moe.experts.gate_up_proj.shape[0] == moe.experts.down_proj.shape[0] == E + 1
    shared = hf.model.layers[1].mlp.shared_expert
    gate_up = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
    assert torch.equal(moe.experts.gate_up_proj[E], gate_up)
    assert torch.equal(moe.experts.down_proj[E], shared.down_proj.weight)


@pytest.mark.parametrize("missing", ["down_proj", "up_proj"])
def test_missing_shared_expert_tensor_is_reported(checkpoints, tmp_path, missing):
    """Expert E's slice stays NaN until all three shared-expert tensors arrive: a missing one is an error."""
    import shutil

    from safetensors.torch import load_file, save_file

    from deltaserve.errors import CheckpointError

    _, d = checkpoints["qwen3_5_moe"]
    shutil.copytree(d, tmp_path / "ckpt")
    name = f"model.layers.1.mlp.shared_expert.{missing}.weight"
    for shard in (tmp_path / "ckpt").glob("*.safetensors"):
        tensors = load_file(shard)
        if tensors.pop(name, None) is not None:
            save_file(tensors, shard)
    param = "down_proj" if missing == "down_proj" else "gate_up_proj"
    with pytest.raises(CheckpointError, match=rf"model\.layers\.1\.mlp\.experts\.{param}"):
        load_model(tmp_path / "ckpt", dtype=torch.float32)


@pytest.mark.parametrize("kind", ["qwen3_5_moe", "qwen3_next"])
def test_gemm_router_matches_transformers(checkpoints, kind):
    """``--moe-router gemm``: logits from one GEMM over [gate; shared gate] (folded shared expert) or the gate
    alone (Qwen3-Next's wider shared expert), then the top-k step -- the same model function."""
    hf, d = checkpoints[kind]
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    model = load_model(d, dtype=torch.float32)
    model.set_moe_router("gemm")
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "router_weight"))
    assert moe.router == "gemm" and moe.router_weight.shape[0] == moe.gate.weight.shape[0] + moe.fold_shared
    _, ours = Runner(model).prefill(ids)
    assert rel(ours, _hf_logits(hf, ids)) < 1e-4
    with pytest.raises(ValueError, match="must be one of"):
        model.set_moe_router("fast")
