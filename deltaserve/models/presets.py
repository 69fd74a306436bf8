"""Model presets for `make-model`: real Qwen3.5 / Qwen3-Next shapes, and how they render to config.json.

Shapes come from docs/GDN_REFERENCE.md ("Real configs"). Each preset holds the text-model fields;
`render_config` turns one into the config.json of the released checkpoint: Qwen3.5 nests the text
model under `text_config` (next to a vision config the engine ignores), Qwen3-Next is flat.
"""

from __future__ import annotations

from typing import Any

QWEN3_5_COMMON: dict[str, Any] = {
    "head_dim": 256,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "partial_rotary_factor": 0.25,
    "rope_theta": 1e7,
    "vocab_size": 248320,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
}
_MOE = {"model_type": "qwen3_5_moe", "default_dtype": "bfloat16"}
_DENSE = {"model_type": "qwen3_5", "default_dtype": "bfloat16"}


def _text(**fields: Any) -> dict[str, Any]:
    return {**QWEN3_5_COMMON, **fields}


# `model_type` picks the checkpoint layout; `text` holds the text-model config fields.
PRESETS: dict[str, dict] = {
    "tiny": {
        "model_type": "qwen3_5",
        "default_dtype": "float32",
        "text": _text(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, intermediate_size=128, max_position_embeddings=4096,
            vocab_size=None,  # the demo tokenizer's size, rounded up to a multiple of 64
            tie_word_embeddings=False,
        ),
        "vision": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                   "num_position_embeddings": 64},
    },
    "qwen3.5-0.8b": {**_DENSE, "text": _text(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=3584, linear_num_value_heads=16, tie_word_embeddings=True)},
    "qwen3.5-9b": {**_DENSE, "text": _text(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=12288, linear_num_value_heads=32, tie_word_embeddings=False)},
    "qwen3.5-27b": {**_DENSE, "text": _text(
        hidden_size=5120, num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4,
        intermediate_size=17408, linear_num_value_heads=48, tie_word_embeddings=False)},
    "qwen3.5-35b-a3b": {**_MOE, "text": _text(
        hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
        linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, tie_word_embeddings=False)},
    "qwen3.5-122b-a10b": {**_MOE, "text": _text(
        hidden_size=3072, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=2,
        linear_num_value_heads=64, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024, tie_word_embeddings=False)},
    "qwen3-next-80b-a3b": {"model_type": "qwen3_next", "default_dtype": "bfloat16", "text": {
        **QWEN3_5_COMMON,
        "vocab_size": 151936, "rope_theta": 5e6,
        "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 16,
        "num_key_value_heads": 2, "linear_num_value_heads": 32, "intermediate_size": 5632,
        "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "tie_word_embeddings": False}},
}

ARCHITECTURES = {
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_next": "Qwen3NextForCausalLM",
}
DTYPES = ("bfloat16", "float16", "float32")


def layer_types(num_layers: int, interval: int = 4) -> list[str]:
    """Every `interval`-th layer is full attention, the rest Gated DeltaNet (as HF's default)."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]


def mrope_section(head_dim: int, partial_rotary_factor: float) -> list[int]:
    """M-RoPE split of the rotary frequencies over (t, h, w): [11, 11, 10] for the real 64 rotary dims."""
    n = int(head_dim * partial_rotary_factor) // 2
    base, rem = divmod(n, 3)
    return [base + (rem > 0), base + (rem > 1), base]


def text_fields(preset: str, layers: int | None, overrides: dict | None, vocab_size: int) -> dict[str, Any]:
    """The preset's text-model fields after `layers` and test `overrides`, with layer_types filled in."""
    fields = dict(PRESETS[preset]["text"])
    if fields["vocab_size"] is None:
        fields["vocab_size"] = vocab_size
    if layers is not None:
        fields["num_hidden_layers"] = layers
    fields.update(overrides or {})
    if "layer_types" not in (overrides or {}):
        fields["layer_types"] = layer_types(fields["num_hidden_layers"], fields["full_attention_interval"])
    return fields


def render_config(preset: str, text: dict[str, Any], dtype: str, ids: dict[str, int]) -> dict[str, Any]:
    """config.json for `preset`, laid out as the released checkpoint of that family."""
    model_type = PRESETS[preset]["model_type"]
    text = dict(text)
    common = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mamba_ssm_dtype": "float32",
        "mtp_num_hidden_layers": 1,
        "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "dtype": dtype,
    }
    theta = text.pop("rope_theta")
    rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": text["partial_rotary_factor"]}
    if model_type == "qwen3_next":
        return {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
                **common, **text, "rope_parameters": rope}
    rope.update(mrope_section=mrope_section(text["head_dim"], text["partial_rotary_factor"]),
                mrope_interleaved=True)
    text_config = {"model_type": f"{model_type}_text", **common, "mtp_use_dedicated_embeddings": False,
                   **text, "rope_parameters": rope}
    vision = {
        "model_type": f"{model_type}_vision", "depth": 27, "hidden_size": 1152,
        "intermediate_size": 4304, "num_heads": 16, "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "num_position_embeddings": 2304, "out_hidden_size": text["hidden_size"],
        "deepstack_visual_indexes": [], "initializer_range": 0.02,
        **PRESETS[preset].get("vision", {}),
    }
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "text_config": text_config,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        # Both places, same value: transformers reads the top-level one for the conditional model.
        "tie_word_embeddings": text["tie_word_embeddings"],
        "dtype": dtype,
    }
