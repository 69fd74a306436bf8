"""make-model: presets match the real configs, checkpoints load in transformers, tokenizer, demo cache."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from deltaserve.models import make_model as mm
from deltaserve.models.demo_tokenizer import ANIMALS, SPECIAL_TOKENS, _trained_json, train_tokenizer
from deltaserve.models.make_model import add_make_model_args, demo_model_dir, main_make_model, make_model
from deltaserve.models.presets import PRESETS

# GDN_REFERENCE.md "Real configs": H, layers, full-attention layers, heads, kv heads, dense I, Hv,
# (experts, top-k, moe I, shared I), tied, vocab.
REFERENCE = {
    "qwen3.5-0.8b": (1024, 24, 6, 8, 2, 3584, 16, None, True, 248320),
    "qwen3.5-9b": (4096, 32, 8, 16, 4, 12288, 32, None, False, 248320),
    "qwen3.5-27b": (5120, 64, 16, 24, 4, 17408, 48, None, False, 248320),
    "qwen3.5-35b-a3b": (2048, 40, 10, 16, 2, None, 32, (256, 8, 512, 512), False, 248320),
    "qwen3.5-122b-a10b": (3072, 48, 12, 32, 2, None, 64, (256, 8, 1024, 1024), False, 248320),
    "qwen3-next-80b-a3b": (2048, 48, 12, 16, 2, None, 32, (512, 10, 512, 512), False, 151936),
}
ARCH = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
        "qwen3_next": "Qwen3NextForCausalLM"}
# A shrunk text model, for checking the MoE / Qwen3-Next weight layouts without gigabytes.
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
         "linear_value_head_dim": 16, "vocab_size": 2048, "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for f in files:
        with safe_open(d / f, "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """tiny with weights, sharded (50 KB shards)."""
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), max_shard_size=50_000)


@pytest.mark.parametrize("preset", list(REFERENCE))
def test_preset_config_matches_reference(preset, tmp_path):
    d = make_model(preset, tmp_path, no_weights=True)
    h, n, n_full, heads, kv, inter, hv, moe, tied, vocab = REFERENCE[preset]
    raw = json.loads((d / "config.json").read_text())
    cfg = transformers.AutoConfig.from_pretrained(d)
    t = cfg.get_text_config()
    assert raw["architectures"] == [ARCH[PRESETS[preset]["model_type"]]]
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (h, n, heads, kv)
    assert t.layer_types.count("full_attention") == n_full and t.layer_types[3] == "full_attention"
    assert (t.linear_num_value_heads, t.linear_num_key_heads, t.linear_key_head_dim, t.head_dim) == (hv, 16, 128, 256)
    assert (t.vocab_size, t.tie_word_embeddings, cfg.tie_word_embeddings) == (vocab, tied, tied)
    assert t.rope_parameters["partial_rotary_factor"] == 0.25 and t.mamba_ssm_dtype == "float32"
    if inter is not None:
        assert t.intermediate_size == inter
    if moe is not None:
        assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size,
                t.shared_expert_intermediate_size) == moe
    if preset.startswith("qwen3.5"):
        assert raw["text_config"]["model_type"] == raw["model_type"] + "_text"
        assert t.rope_parameters["mrope_section"] == [11, 11, 10] and t.rope_parameters["mrope_interleaved"]
        assert t.rope_parameters["rope_theta"] == 1e7 and t.max_position_embeddings == 262144
    else:
        assert "text_config" not in raw and t.rope_parameters["rope_theta"] == 5e6 and t.norm_topk_prob
    assert not list(d.glob("*.safetensors*"))  # no_weights


@pytest.mark.parametrize("preset", list(PRESETS))
def test_layers_override_keeps_the_pattern(preset, tmp_path):
    t = transformers.AutoConfig.from_pretrained(make_model(preset, tmp_path, layers=5, no_weights=True))
    t = t.get_text_config()
    assert t.num_hidden_layers == 5
    assert t.layer_types == ["linear_attention"] * 3 + ["full_attention", "linear_attention"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"preset": "qwen9"}, "qwen3.5-9b"), ({"layers": 0}, "layers=0"), ({"dtype": "int8"}, "bfloat16")])
def test_bad_arguments_raise_value_error_naming_choices(kwargs, needle, tmp_path):
    args = {"preset": "tiny", "out_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=needle):
        make_model(args.pop("preset"), args.pop("out_dir"), no_weights=True, **args)


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    """The tiny checkpoint loaded by transformers, with its loading report."""
    return transformers.Qwen3_5ForConditionalGeneration.from_pretrained(tiny, output_loading_info=True)


def test_tiny_sharded_checkpoint_matches_transformers(tiny, hf_tiny):
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = sorted(tiny.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (tiny / "model.safetensors").exists()
    weights = _weights(tiny)
    assert index["metadata"]["total_size"] == sum(w.numel() * w.element_size() for w in weights.values())
    assert all(w.dtype == torch.float32 for w in weights.values())
    model, info = hf_tiny
    assert not info["mismatched_keys"] and not info["unexpected_keys"]
    # Only the vision tower (of which we write one conv) is missing; every text weight loads.
    assert info["missing_keys"] and all(k.startswith("model.visual.") for k in info["missing_keys"])
    hf = model.state_dict()
    text = {k: v.shape for k, v in hf.items() if not k.startswith("model.visual.")}
    ours = {k: w.shape for k, w in weights.items() if not k.startswith(("mtp.", "model.visual."))}
    assert ours == text
    assert any(k.startswith("mtp.") for k in weights) and any(k.startswith("model.visual.") for k in weights)
    for name in ["lm_head.weight", "model.language_model.layers.2.linear_attn.A_log"]:
        assert torch.equal(hf[name], weights[name])


def test_tiny_greedy_generation_is_varied_and_decodable(tiny, hf_tiny):
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    model, _ = hf_tiny
    for prompt in ["Write a 1000-word story about a cat.", "Hello, how are you?", "1, 2, 3, 4,"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
        assert len(set(out.tolist())) > 5, out
        assert int(out.max()) < len(tok)  # padded vocab rows are zero: never picked


def test_vocab_padding_rows_are_zero_and_tied_model_has_no_lm_head(tmp_path):
    d = make_model("qwen3.5-0.8b", tmp_path, layers=1, _overrides=SMALL)
    weights = _weights(d)
    n_tok = len(train_tokenizer().get_vocab())
    emb = weights["model.language_model.embed_tokens.weight"]
    assert "lm_head.weight" not in weights and emb.dtype == torch.bfloat16
    assert emb[n_tok:].abs().sum() == 0 and emb[:n_tok].abs().sum(dim=1).gt(0).all()


def test_qwen3_5_moe_stacked_experts_match_transformers(tmp_path):
    d = make_model("qwen3.5-35b-a3b", tmp_path, layers=4, _overrides=SMALL)
    weights = _weights(d)
    p = "model.language_model.layers.0.mlp."
    assert weights[p + "experts.gate_up_proj"].shape == (4, 64, 64)  # [E, 2I, H]
    assert weights[p + "experts.down_proj"].shape == (4, 64, 32)  # [E, H, I]
    assert weights[p + "shared_expert_gate.weight"].shape == (1, 64)
    assert weights["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"].shape == (2 * 32 + 64, 64)
    text_config = transformers.AutoConfig.from_pretrained(d).text_config
    hf = transformers.Qwen3_5MoeForCausalLM(text_config).state_dict()
    hf = {k.replace("model.", "model.language_model.", 1): v.shape for k, v in hf.items()}
    ours = {k: w.shape for k, w in weights.items() if not k.startswith(("mtp.", "model.visual."))}
    assert ours == hf


def test_qwen3_next_layout_loads_in_transformers(tmp_path):
    d = make_model("qwen3-next-80b-a3b", tmp_path, layers=4, _overrides=SMALL)
    weights = _weights(d)
    p = "model.layers.0."
    assert weights[p + "linear_attn.in_proj_qkvz.weight"].shape == (2 * 32 + 2 * 64, 64)
    assert weights[p + "linear_attn.in_proj_ba.weight"].shape == (2 * 4, 64)
    assert weights[p + "mlp.experts.3.down_proj.weight"].shape == (64, 32)
    assert weights[p + "mlp.experts.0.gate_proj.weight"].shape == (32, 64)
    assert "model.layers.3.self_attn.q_proj.weight" in weights and "lm_head.weight" in weights
    _, info = transformers.Qwen3NextForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_seeded_dtype_and_stale_shards(tmp_path):
    a = _weights(make_model("tiny", tmp_path / "a", seed=1))
    b = _weights(make_model("tiny", tmp_path / "b", seed=1, dtype="bfloat16", max_shard_size=100_000))
    c = _weights(make_model("tiny", tmp_path / "c", seed=2))
    name = "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"
    assert b[name].dtype == torch.bfloat16 and torch.equal(a[name].to(torch.bfloat16), b[name])
    assert not torch.equal(a[name], c[name])
    a_log = a["model.language_model.layers.0.linear_attn.A_log"].exp()
    assert ((a_log >= 1) & (a_log <= 16)).all()
    make_model("tiny", tmp_path / "b", seed=1)  # re-made as one file: the old shards must go
    assert sorted(p.name for p in (tmp_path / "b").glob("model*")) == ["model.safetensors"]


def test_tokenizer_round_trip_specials_and_prompts(tiny):
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    for s in ["Hello, world! 1234567890 (a+b)*c", "héllo 世界 🙂", "  two  spaces\n\ttab"]:
        assert tok.decode(tok.encode(s)) == s
    for special in SPECIAL_TOKENS:
        assert len(tok.encode(special)) == 1
    assert tok.encode("<|im_start|>user")[0] == tok.convert_tokens_to_ids("<|im_start|>")
    for animal in ANIMALS:
        assert len(tok.encode(f"Write a 1000-word story about a {animal}.")) <= 12
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert _trained_json.__wrapped__() == train_tokenizer().to_str()  # a fresh training run: same ids


def test_chat_template(tiny):
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    text = tok.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_demo_model_dir_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTASERVE_CACHE", str(tmp_path))
    dirs: list[Path] = []
    threads = [threading.Thread(target=lambda: dirs.append(demo_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(dirs) == 2 and dirs[0] == dirs[1] and dirs[0].parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [dirs[0].name]  # no temp dirs left behind
    mtime = (dirs[0] / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(mm, "make_model", lambda *a, **k: pytest.fail("rebuilt the demo model"))
    assert demo_model_dir() == dirs[0]
    assert (dirs[0] / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((dirs[0] / "config.json").read_text())["text_config"]["dtype"] == "float32"


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_make_model_args(parser)
    args = parser.parse_args(["--preset", "qwen3.5-9b", "--out", str(tmp_path), "--layers", "2", "--no-weights"])
    assert main_make_model(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "Qwen3_5ForConditionalGeneration" in out and "2 layers" in out
    assert main_make_model(parser.parse_args(["--preset", "nope", "--out", str(tmp_path)])) == 2
    assert "nope" in capsys.readouterr().out
