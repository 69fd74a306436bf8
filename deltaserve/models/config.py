"""ModelConfig: the text model's shape, read once from an HF checkpoint directory.

transformers parses ``config.json`` (flat Qwen3-Next configs and Qwen3.5's nested ``text_config``,
``layer_types`` or ``full_attention_interval``, legacy ``rope_theta`` vs ``rope_parameters``); this
module turns the result into one frozen dataclass with the derived sizes every layer needs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from deltaserve.errors import CheckpointError, UnsupportedModelError

logger = logging.getLogger(__name__)

# architecture -> (checkpoint GDN layout, prefix of the text weights in the checkpoint)
ARCHITECTURES = {
    "Qwen3NextForCausalLM": ("qwen3_next", "model."),
    "Qwen3_5ForCausalLM": ("qwen3_5", "model."),
    "Qwen3_5MoeForCausalLM": ("qwen3_5", "model."),
    "Qwen3_5ForConditionalGeneration": ("qwen3_5", "model.language_model."),
    "Qwen3_5MoeForConditionalGeneration": ("qwen3_5", "model.language_model."),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    gdn_layout: str  # "qwen3_5" (in_proj_qkv/z/b/a) or "qwen3_next" (interleaved in_proj_qkvz/ba)
    weight_prefix: str  # where the text weights live in the checkpoint
    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]  # "linear_attention" | "full_attention" per layer
    mlp_types: tuple[str, ...]  # "dense" | "moe" per layer
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    dtype: str  # the checkpoint's dtype, e.g. "bfloat16"
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    attention_bias: bool
    # gated delta net
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MLPs
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def num_gdn_layers(self) -> int:
        return self.layer_types.count("linear_attention")

    @property
    def num_attention_layers(self) -> int:
        return self.layer_types.count("full_attention")

    @property
    def is_moe(self) -> bool:
        return "moe" in self.mlp_types


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a model directory needs a config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _eos_ids(model_dir: Path, text_cfg) -> tuple[int, ...]:
    """All EOS ids: generation_config.json first (it lists several for chat models), then config."""
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id")] if gen.exists() else []
    sources.append(getattr(text_cfg, "eos_token_id", None))
    for value in sources:
        for i in [value] if isinstance(value, int) else (value or []):
            if i not in ids:
                ids.append(int(i))
    return tuple(ids)


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` (+ ``generation_config.json``) of an HF checkpoint directory."""
    model_dir = Path(model_dir)
    raw = _load_json(model_dir / "config.json")
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{model_dir / 'config.json'}: architectures={archs} is not supported; deltaserve serves "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a bad config
        raise CheckpointError(f"{model_dir / 'config.json'}: transformers cannot parse it: {e}") from e
    text = hf.get_text_config()
    layout, prefix = ARCHITECTURES[arch]
    rope = dict(getattr(text, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    num_experts = getattr(text, "num_experts", 0) or 0
    mlp_only = set(getattr(text, "mlp_only_layers", []) or [])
    sparse_step = getattr(text, "decoder_sparse_step", 1) or 1
    mlp_types = tuple(
        "moe" if num_experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0 else "dense"
        for i in range(text.num_hidden_layers)
    )
    # Nested (multimodal) configs tie at the top level, flat ones in the text config.
    tie = bool(raw.get("tie_word_embeddings", getattr(text, "tie_word_embeddings", False)))
    if hasattr(text, "hidden_act") and text.hidden_act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act={text.hidden_act!r} is not supported (only silu)")
    dtype = raw.get("torch_dtype") or raw.get("dtype") or getattr(text, "dtype", None) or "bfloat16"
    cfg = ModelConfig(
        architecture=arch,
        gdn_layout=layout,
        weight_prefix=prefix,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        layer_types=tuple(text.layer_types[: text.num_hidden_layers]),
        mlp_types=mlp_types,
        rms_norm_eps=text.rms_norm_eps,
        tie_word_embeddings=tie,
        max_position_embeddings=text.max_position_embeddings,
        dtype=str(dtype).replace("torch.", ""),
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        rope_theta=float(rope_theta),
        attention_bias=bool(getattr(text, "attention_bias", False)),
        linear_num_key_heads=text.linear_num_key_heads,
        linear_num_value_heads=text.linear_num_value_heads,
        linear_key_head_dim=text.linear_key_head_dim,
        linear_value_head_dim=text.linear_value_head_dim,
        linear_conv_kernel_dim=text.linear_conv_kernel_dim,
        intermediate_size=getattr(text, "intermediate_size", 0) or 0,
        num_experts=num_experts,
        num_experts_per_tok=getattr(text, "num_experts_per_tok", 0) or 0,
        moe_intermediate_size=getattr(text, "moe_intermediate_size", 0) or 0,
        shared_expert_intermediate_size=getattr(text, "shared_expert_intermediate_size", 0) or 0,
        norm_topk_prob=bool(getattr(text, "norm_topk_prob", True)),
        eos_token_ids=_eos_ids(model_dir, text),
    )
    _validate(cfg, model_dir)
    return cfg


def _validate(cfg: ModelConfig, model_dir: Path) -> None:
    where = model_dir / "config.json"
    bad = set(cfg.layer_types) - {"linear_attention", "full_attention"}
    if bad:
        raise UnsupportedModelError(f"{where}: unknown layer_types {sorted(bad)}")
    if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
        raise CheckpointError(
            f"{where}: linear_num_value_heads={cfg.linear_num_value_heads} must be a multiple of "
            f"linear_num_key_heads={cfg.linear_num_key_heads}"
        )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError(
            f"{where}: num_attention_heads={cfg.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={cfg.num_key_value_heads}"
        )
    if "dense" in cfg.mlp_types and cfg.intermediate_size <= 0:
        raise CheckpointError(f"{where}: dense MLP layers need intermediate_size > 0")
