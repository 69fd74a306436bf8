"""Every kind of bad checkpoint raises an error naming the file and the tensor -- never random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.errors import CheckpointError, UnsupportedModelError
from deltaserve.models.loader import load_model
from deltaserve.models.make_model import make_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("good"), dtype="float32", max_shard_size=600_000)


@pytest.fixture
def ckpt(good, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    return d


def _shards(d):
    return sorted(d.glob("model-*.safetensors"))


def _rewrite(path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_the_good_checkpoint_loads(good):
    model = load_model(good, dtype=torch.float32)
    assert not any(torch.isnan(p).any() for p in model.parameters())
    assert len(_shards(good)) > 1


def test_missing_tensor_names_the_parameter(ckpt):
    name = "model.language_model.layers.1.linear_attn.in_proj_z.weight"
    for shard in _shards(ckpt):
        if name in load_file(shard):
            _rewrite(shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.linear_attn\.in_proj\.weight"):
        load_model(ckpt, dtype=torch.float32)


def test_missing_k_proj_names_the_merged_qkv_and_the_tensors_it_got(ckpt):
    name = "model.language_model.layers.3.self_attn.k_proj.weight"
    for shard in _shards(ckpt):
        if name in load_file(shard):
            _rewrite(shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"parameter 'model\.layers\.3\.self_attn\.qkv_proj\.weight'; it was "
                                              r"loaded only from \S*q_proj\.weight, \S*v_proj\.weight$"):
        load_model(ckpt, dtype=torch.float32)


def test_unexpected_tensor_names_file_and_tensor(ckpt):
    shard = _shards(ckpt)[0]
    _rewrite(shard, lambda t: t.__setitem__("model.language_model.layers.0.mlp.bogus.weight", torch.ones(2, 2)))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: unexpected tensor 'model\.language_model\.layers\.0\.mlp\.bogus\.weight'"):
        load_model(ckpt, dtype=torch.float32)


def test_shape_mismatch_names_tensor_and_both_shapes(ckpt):
    name = "model.language_model.layers.3.self_attn.o_proj.weight"
    for shard in _shards(ckpt):
        if name in load_file(shard):
            _rewrite(shard, lambda t: t.__setitem__(name, torch.ones(64, 100)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*expected .*128.*got .*100"):
        load_model(ckpt, dtype=torch.float32)


def test_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"architectures=\['LlamaForCausalLM'\] is not supported"):
        load_model(ckpt, dtype=torch.float32)


def test_truncated_file_is_reported_as_such(ckpt):
    shard = _shards(ckpt)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*(truncated|corrupt)"):
        load_model(ckpt, dtype=torch.float32)


def test_garbage_file_is_reported(ckpt):
    shard = _shards(ckpt)[0]
    shard.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*(truncated|corrupt)"):
        load_model(ckpt, dtype=torch.float32)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(ckpt, dtype=torch.float32)


def test_invalid_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(ckpt, dtype=torch.float32)


def test_index_listing_a_missing_shard(ckpt):
    _shards(ckpt)[1].unlink()
    with pytest.raises(CheckpointError, match=r"lists model-00002-of-.*missing"):
        load_model(ckpt, dtype=torch.float32)


def test_no_weights_at_all_points_to_dummy(tmp_path):
    d = make_model("tiny", tmp_path, no_weights=True)
    with pytest.raises(CheckpointError, match="load_format='dummy'"):
        load_model(d, dtype=torch.float32)
    model = load_model(d, dtype=torch.float32, load_format="dummy")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dummy_weights_never_pick_ids_the_tokenizer_cannot_decode(tmp_path):
    # Real-shape presets keep their 248,320-id vocabulary next to the small demo tokenizer: random
    # output rows past the tokenizer would make a greedy stream of undecodable ids (no text at all).
    from deltaserve import LLM, SamplingParams
    from deltaserve.models.loader import tokenizer_size

    d = make_model("tiny", tmp_path, no_weights=True, _overrides={"vocab_size": 8192})
    live = tokenizer_size(d)
    assert live is not None and live < 8192
    model = load_model(d, dtype=torch.float32, load_format="dummy")
    assert model.lm_head.weight[live:].abs().sum() == 0 and model.lm_head.weight[:live].abs().sum() > 0
    llm = LLM(str(d), device="cpu", load_format="dummy", dtype="float32", max_num_seqs=1, max_model_len=256)
    out = llm.generate("Write a story about an owl.", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 16 and max(out.token_ids) < live and out.text
