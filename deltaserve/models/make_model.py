"""`deltaserve make-model`: write an HF-format checkpoint with random weights at real shapes.

No hub access: the config comes from `presets.py`, the tokenizer is trained on the spot
(`demo_tokenizer.py`), and the weights are seeded random tensors named and laid out as in the
released checkpoints (Qwen3.5: `model.language_model.*`, stacked MoE experts, plus a few `mtp.*`
and `model.visual.*` tensors a text loader must skip; Qwen3-Next: `model.*`, fused
`in_proj_qkvz`/`in_proj_ba`, per-expert MLPs). Tensors are generated one shard at a time, so a
50 GB checkpoint never sits in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from deltaserve.models.demo_tokenizer import special_token_ids, train_tokenizer, write_tokenizer
from deltaserve.models.presets import DTYPES, PRESETS, render_config, text_fields

logger = logging.getLogger(__name__)

# normal(0, 0.02) (HF's initializer_range) keeps the residual stream O(1-10) at real shapes, and
# still gives tiny varied greedy output; norm weights are zero-centred, so ~0; conv: 1/sqrt(kernel 4).
STDS = {"linear": 0.02, "norm": 0.01, "conv": 0.5}
_CHUNK = 1 << 22  # elements per randn call (16 MB of fp32 scratch per thread); also the unit of parallelism


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: name, shape and how to initialise it (a `STDS` key, "ones" or "a_log").

    `live_rows`: rows past it are zeroed. Used on the output embedding for the vocab padding past the
    tokenizer, so that a random model never picks an id the tokenizer cannot decode.
    """

    name: str
    shape: tuple[int, ...]
    init: str = "linear"
    live_rows: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _gdn(p: str, t: dict[str, Any], next_layout: bool) -> list[TensorSpec]:
    hk, hv, dk, dv = (t["linear_num_key_heads"], t["linear_num_value_heads"],
                      t["linear_key_head_dim"], t["linear_value_head_dim"])
    h, key_dim, value_dim = t["hidden_size"], hk * dk, hv * dv
    conv_dim = 2 * key_dim + value_dim
    if next_layout:  # rows interleaved per key-head group; only the shape matters for random values
        proj = [TensorSpec(p + "in_proj_qkvz.weight", (conv_dim + value_dim, h)),
                TensorSpec(p + "in_proj_ba.weight", (2 * hv, h))]
    else:
        proj = [TensorSpec(p + "in_proj_qkv.weight", (conv_dim, h)),
                TensorSpec(p + "in_proj_z.weight", (value_dim, h)),
                TensorSpec(p + "in_proj_b.weight", (hv, h)),
                TensorSpec(p + "in_proj_a.weight", (hv, h))]
    return proj + [
        TensorSpec(p + "conv1d.weight", (conv_dim, 1, t["linear_conv_kernel_dim"]), "conv"),
        TensorSpec(p + "dt_bias", (hv,), "ones"),
        TensorSpec(p + "A_log", (hv,), "a_log"),
        TensorSpec(p + "norm.weight", (dv,), "ones"),  # RMSNormGated: plain x̂·w, so ones
        TensorSpec(p + "out_proj.weight", (h, value_dim)),
    ]


def _attn(p: str, t: dict[str, Any]) -> list[TensorSpec]:
    h, hd, nq, nkv = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    return [
        TensorSpec(p + "q_proj.weight", (nq * hd * 2, h)),  # per head [q | gate]
        TensorSpec(p + "k_proj.weight", (nkv * hd, h)),
        TensorSpec(p + "v_proj.weight", (nkv * hd, h)),
        TensorSpec(p + "o_proj.weight", (h, nq * hd)),
        TensorSpec(p + "q_norm.weight", (hd,), "norm"),
        TensorSpec(p + "k_norm.weight", (hd,), "norm"),
    ]


def _swiglu(p: str, h: int, i: int) -> list[TensorSpec]:
    return [TensorSpec(p + "gate_proj.weight", (i, h)), TensorSpec(p + "up_proj.weight", (i, h)),
            TensorSpec(p + "down_proj.weight", (h, i))]


def _mlp(p: str, t: dict[str, Any], model_type: str, layer: int) -> list[TensorSpec]:
    h = t["hidden_size"]
    sparse = model_type == "qwen3_5_moe" or (
        model_type == "qwen3_next" and layer not in t["mlp_only_layers"]
        and (layer + 1) % t["decoder_sparse_step"] == 0)
    if not sparse:
        return _swiglu(p, h, t["intermediate_size"])
    e, i = t["num_experts"], t["moe_intermediate_size"]
    if model_type == "qwen3_5_moe":  # stacked: gate rows then up rows
        experts = [TensorSpec(p + "experts.gate_up_proj", (e, 2 * i, h)),
                   TensorSpec(p + "experts.down_proj", (e, h, i))]
    else:
        experts = [s for x in range(e) for s in _swiglu(f"{p}experts.{x}.", h, i)]
    return [TensorSpec(p + "gate.weight", (e, h)), *experts,
            *_swiglu(p + "shared_expert.", h, t["shared_expert_intermediate_size"]),
            TensorSpec(p + "shared_expert_gate.weight", (1, h))]


def checkpoint_tensors(config: dict[str, Any], live_vocab: int | None = None) -> list[TensorSpec]:
    """Every tensor of the checkpoint described by `config` (a rendered config.json), in file order.

    `live_vocab`: the tokenizer's size; output-embedding rows past it are zeroed.
    """
    model_type = config["model_type"]
    t = config.get("text_config", config)
    h, vocab, tied = t["hidden_size"], t["vocab_size"], t["tie_word_embeddings"]
    prefix = "model." if model_type == "qwen3_next" else "model.language_model."
    specs = [TensorSpec(prefix + "embed_tokens.weight", (vocab, h), live_rows=live_vocab if tied else None)]
    for i, kind in enumerate(t["layer_types"]):
        p = f"{prefix}layers.{i}."
        specs += [TensorSpec(p + "input_layernorm.weight", (h,), "norm")]
        if kind == "full_attention":
            specs += _attn(p + "self_attn.", t)
        else:
            specs += _gdn(p + "linear_attn.", t, next_layout=model_type == "qwen3_next")
        specs += [TensorSpec(p + "post_attention_layernorm.weight", (h,), "norm")]
        specs += _mlp(p + "mlp.", t, model_type, i)
    specs += [TensorSpec(prefix + "norm.weight", (h,), "norm")]
    if not tied:
        specs += [TensorSpec("lm_head.weight", (vocab, h), live_rows=live_vocab)]
    # A few of the release's extra tensors, so that loaders are tested on skipping them.
    specs += [TensorSpec("mtp.fc.weight", (h, 2 * h))] + [
        TensorSpec(f"mtp.{n}.weight", (h,), "norm") for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")]
    if "vision_config" in config:
        v = config["vision_config"]
        kernel = (v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
        specs += [TensorSpec("model.visual.patch_embed.proj.weight", (v["hidden_size"], *kernel)),
                  TensorSpec("model.visual.patch_embed.proj.bias", (v["hidden_size"],), "norm")]
    return specs


def _fill(out: torch.Tensor, spec: TensorSpec, chunk: int, seed: int) -> None:
    """Fill chunk `chunk` of `out` (flat, `_CHUNK` elements each) as `spec.init` says.

    Each chunk has its own generator, seeded by (seed, name, chunk): values do not depend on the
    sharding, the other tensors or the thread that draws them.
    """
    digest = hashlib.sha256(f"{seed}:{spec.name}:{chunk}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    part = out.view(-1)[chunk * _CHUNK:(chunk + 1) * _CHUNK]
    if spec.init == "ones":
        part.fill_(1.0)
    elif spec.init == "a_log":  # A = -exp(A_log) with A ~ U(1, 16), as in the HF / Mamba2 init
        part.copy_(torch.empty(part.numel()).uniform_(1, 16, generator=g).log_())
    else:
        part.copy_(torch.randn(part.numel(), generator=g).mul_(STDS[spec.init]))
    if spec.live_rows is not None:  # zero this chunk's share of the rows past live_rows
        first_dead = spec.live_rows * math.prod(spec.shape[1:]) - chunk * _CHUNK
        part[max(first_dead, 0):] = 0


def _random_tensors(specs: list[TensorSpec], seed: int, dtype: torch.dtype, pool: ThreadPoolExecutor) -> dict[str, torch.Tensor]:
    """The tensors of one shard; chunks are drawn in parallel (randn releases the GIL)."""
    tensors = {s.name: torch.empty(s.shape, dtype=dtype) for s in specs}
    jobs = [(tensors[s.name], s, k) for s in specs for k in range(max(1, -(-s.numel // _CHUNK)))]
    list(pool.map(lambda job: _fill(*job, seed), jobs))
    return tensors


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy in file order; a tensor larger than `max_shard_size` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _write_weights(out: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int, max_shard_size: int) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(specs, itemsize, max_shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    weight_map: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for fname, shard in zip(names, shards, strict=True):
            tensors = _random_tensors(shard, seed, dtype, pool)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
            logger.info("wrote %s (%d tensors)", fname, len(tensors))
            del tensors
    total = sum(s.numel for s in specs) * itemsize
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index)
    return total


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _check_args(preset: str, layers: int | None, dtype: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise ValueError(f"layers={layers!r} must be an integer >= 1 (or None for the preset's count)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def make_model(preset: str, out_dir: str | Path, *, layers: int | None = None, dtype: str | None = None,
               no_weights: bool = False, seed: int = 0, max_shard_size: int = 2 * 1024**3,
               _overrides: dict[str, Any] | None = None) -> Path:
    """Write preset `preset` as an HF checkpoint directory `out_dir` and return its path.

    `dtype` None means the preset's default (float32 for tiny, bfloat16 otherwise). `no_weights`
    writes config, generation config and tokenizer only (for `--load-format dummy`).
    `_overrides` updates text-config fields (tests use it to shrink MoE / Qwen3-Next presets).
    """
    dtype = dtype or (PRESETS[preset]["default_dtype"] if preset in PRESETS else "bfloat16")
    _check_args(preset, layers, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()  # a stale single file or index would shadow the new shards
    tok = train_tokenizer()
    ids = special_token_ids(tok)
    vocab = -(-tok.get_vocab_size() // 64) * 64
    text = text_fields(preset, layers, _overrides, vocab_size=vocab)
    config = render_config(preset, text, dtype, ids)
    write_tokenizer(tok, out, model_max_length=text["max_position_embeddings"])
    _write_json(out / "config.json", config)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]})
    if not no_weights:
        specs = checkpoint_tensors(config, live_vocab=tok.get_vocab_size())
        _write_weights(out, specs, getattr(torch, dtype), seed, max_shard_size)
    return out


def add_make_model_args(parser: argparse.ArgumentParser) -> None:
    """The `make-model` flags."""
    parser.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)} (default tiny)")
    parser.add_argument("--out", required=True, help="output directory (created; old weights replaced)")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--dtype", default=None, help=f"one of {', '.join(DTYPES)} "
                        "(default: float32 for tiny, bfloat16 otherwise)")
    parser.add_argument("--no-weights", action="store_true", help="config + tokenizer only (--load-format dummy)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights")


def main_make_model(args: argparse.Namespace) -> int:
    """CLI handler: write the checkpoint and print what was written."""
    start = time.perf_counter()
    try:
        out = make_model(args.preset, args.out, layers=args.layers, dtype=args.dtype,
                         no_weights=args.no_weights, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    config = json.loads((out / "config.json").read_text())
    t = config.get("text_config", config)
    specs = checkpoint_tensors(config)
    n_full = t["layer_types"].count("full_attention")
    on_disk = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out}: {args.preset}, {config['architectures'][0]}, {len(t['layer_types'])} layers "
          f"({len(t['layer_types']) - n_full} GDN + {n_full} full), {t['dtype']}, "
          f"{sum(s.numel for s in specs) / 1e9:.3f}B params in {len(specs)} tensors, "
          f"{'no weights' if args.no_weights else f'{on_disk / 1e9:.3f} GB of weights'}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def _source_hash() -> str:
    """Hash of the generator's source: a changed generator gets a fresh demo cache dir."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("make_model.py", "presets.py", "demo_tokenizer.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def demo_model_dir() -> Path:
    """The built-in demo model (`tiny`, float32), built on first use into the cache.

    Safe under concurrency: each caller builds in its own temp dir and renames it into place;
    a loser of the rename race discards its copy and uses the winner's.
    """
    root = Path(os.environ.get("DELTASERVE_CACHE") or Path.home() / ".cache" / "deltaserve")
    final = root / f"demo-tiny-{_source_hash()}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        make_model("tiny", tmp, dtype="float32")
        tmp.chmod(0o755)  # mkdtemp made it owner-only
        os.rename(tmp, final)
        logger.info("built the demo model in %s", final)
    except OSError:
        if not (final / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
