"""Build a model from an HF checkpoint directory and load its weights.

* The model is created on the meta device (no memory, no random init), then materialised on the
  target device in the target dtype, and every parameter is filled with NaN: a parameter still
  holding NaN after loading was never written, which is reported as a missing tensor -- never a
  silently random weight.
* Weights come from safetensors, single-file or sharded (``model.safetensors.index.json``), read
  through lazy slices so each tensor-parallel rank reads only its own rows.
* ``load_format="dummy"`` fills random weights directly on the device instead (benchmarks at real
  shapes without a 69 GB file on disk).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from deltaserve.errors import CheckpointError
from deltaserve.layers.inproj import InProjPlan
from deltaserve.layers.linear import copy_checked
from deltaserve.layers.rotary import RotaryEmbedding
from deltaserve.models.config import ModelConfig, load_model_config
from deltaserve.models.qwen3_next import Qwen3NextForCausalLM

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, plan: InProjPlan) -> Qwen3NextForCausalLM:
    """Instantiate on the meta device, then allocate (uninitialised) on ``device`` in ``dtype``."""
    with torch.device("meta"), _default_dtype(dtype):
        model = Qwen3NextForCausalLM(cfg, plan)
    loaders = {n: p.weight_loader for n, p in model.named_parameters() if hasattr(p, "weight_loader")}
    model.to_empty(device=device)  # new Parameter objects: re-attach loaders, re-tie the head
    for n, p in model.named_parameters():
        if n in loaders:
            p.weight_loader = loaders[n]
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_buffers()
    return model.eval()


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} lists {f.name}, which is missing from {model_dir}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{model_dir} has no *.safetensors weights; for a config-only directory use load_format='dummy'"
        )
    return files


def default_weight_loader(param: torch.nn.Parameter, loaded, shard=None, name: str = "") -> None:
    copy_checked(param.data, loaded, name)


def load_weights(model: Qwen3NextForCausalLM, model_dir: Path) -> None:
    params = dict(model.named_parameters())
    for p in params.values():
        p.data.fill_(float("nan"))
    skipped = 0
    sources: dict[str, list[str]] = {}  # parameter -> the checkpoint tensors loaded into it
    for path in checkpoint_files(model_dir):
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError for damaged files
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from e
        with f:
            for key in f.keys():
                target = model.map_weight(key)
                if target is None:
                    skipped += 1
                    continue
                pname, shard = target
                if pname not in params:
                    raise CheckpointError(f"{path.name}: unexpected tensor {key!r} (no parameter {pname!r} in "
                                          f"{model.config.architecture})")
                param = params[pname]
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, f.get_slice(key), shard, name=f"{path.name}:{key}")
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path.name}: cannot read tensor {key!r} ({e}); the file may be "
                                          f"truncated or corrupt") from e
                sources.setdefault(pname, []).append(key)
    if skipped:
        logger.info("skipped %d vision/MTP tensors (deltaserve serves the text model)", skipped)
    for name, p in params.items():
        if torch.isnan(p.data).any():
            # A packed parameter (e.g. qkv_proj from q_proj, k_proj, v_proj) says which parts it did get.
            got = f"; it was loaded only from {', '.join(sources[name])}" if name in sources else ""
            raise CheckpointError(f"{model_dir}: no checkpoint tensor provides (all of) parameter {name!r}{got}")


def fill_dummy(model: Qwen3NextForCausalLM, seed: int = 0, live_vocab: int | None = None) -> None:
    """Small uniform random weights on the device: finite activations at any depth, ~uniform routing.

    `live_vocab`: the tokenizer's size. Output-embedding rows past it are zeroed (as `make-model` does),
    so that a random model never picks an id the tokenizer cannot decode: a real-shape vocabulary
    (248,320) is far larger than the demo tokenizer, and a stream of undecodable ids carries no text.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        p.data.uniform_(-1e-2, 1e-2, generator=gen)
    if live_vocab is not None:
        head = model.lm_head  # this rank's rows [start, start + per_rank) of the (padded) vocabulary
        head.weight.data[max(0, live_vocab - head.start):].zero_()


def tokenizer_size(model_dir: Path) -> int | None:
    """Ids the tokenizer in `model_dir` can decode (added tokens included); None without tokenizer.json."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    plan: InProjPlan | None = None,
    seed: int = 0,
) -> Qwen3NextForCausalLM:
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"load_format={load_format!r} is not one of {LOAD_FORMATS}")
    model_dir = Path(model_dir)
    cfg = load_model_config(model_dir)
    model = build_model(cfg, dtype, torch.device(device), plan or InProjPlan("fused"))
    with torch.no_grad():
        if load_format == "dummy":
            fill_dummy(model, seed, tokenizer_size(model_dir))
        else:
            load_weights(model, model_dir)
    return model
