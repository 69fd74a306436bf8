"""``bench layer --gemv-tiles``: a bench_gemv.py sweep's best tiles, timed in place of pick_config's (CPU checks
of the reading and the swap; the timing itself needs a GPU)."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

from deltaserve.bench import layer as bench_layer
from deltaserve.errors import ConfigError
from deltaserve.ops import skinny_gemm
from deltaserve.ops.skinny_gemm import GemvConfig, pick_config


def _sweep(tmp_path, rows):
    path = tmp_path / "gemv.json"
    path.write_text(json.dumps({"device": "x", "copy_bandwidth": 1.0, "rows": rows}))
    return str(path)


def test_sweep_tiles_reads_the_best_tile_per_shape_and_m(tmp_path):
    tile = GemvConfig(64, 128, 4, 4, persistent=1)
    rows = [{"shape": "a", "N": 12352, "K": 2048, "M": 64, "best_config": dataclasses.asdict(tile)},
            {"shape": "fit row without a best tile", "N": 12352, "K": 512, "M": 1}]
    assert bench_layer.sweep_tiles(_sweep(tmp_path, rows)) == {(12352, 2048, 64): tile}


@pytest.mark.parametrize("content", ["not json", json.dumps({"rows": [{"N": 1, "K": 2, "M": 3,
                                                                          "best_config": {"bogus": 1}}]}),
                                     json.dumps({"no": "rows"})])
def test_sweep_tiles_names_a_bad_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="--gemv-tiles .*bad.json: not a bench_gemv.py --output file"):
        bench_layer.sweep_tiles(str(path))
    with pytest.raises(ConfigError, match="--gemv-tiles .*missing.json"):
        bench_layer.sweep_tiles(str(tmp_path / "missing.json"))


def test_time_with_tiles_swaps_the_tile_for_that_shape_only_and_restores_it(monkeypatch):
    tile = GemvConfig(64, 128, 4, 4, persistent=1)
    seen = []

    def fake_time_inproj(layers, m, strategy, replays):  # what skinny_linear would pick inside the timing
        seen.append((skinny_gemm.pick_config(m, 12352, 2048), skinny_gemm.pick_config(m, 2048, 4096)))
        return 1.5

    monkeypatch.setattr("deltaserve.layers.inproj_tune.time_inproj", fake_time_inproj)
    layers = [types.SimpleNamespace(in_proj=types.SimpleNamespace(weight=types.SimpleNamespace(shape=(12352, 2048))))]
    tiles = {(12352, 2048, 64): tile}
    assert bench_layer.time_with_tiles(layers, 64, tiles, 3) == 1.5
    assert seen == [(tile, pick_config(64, 2048, 4096))]  # the out_proj keeps its own tile
    assert bench_layer.time_with_tiles(layers, 32, tiles, 3) is None  # M not in the sweep: not timed
    assert skinny_gemm.pick_config is pick_config  # restored
