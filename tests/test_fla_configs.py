"""deltaserve/fla_configs.py: the files it writes are the ones fla's own cache code reads back.

fla's ``fla/ops/utils/cache.py`` is loaded by file path (never ``import fla``: its package import pulls
in its models, and CI does not install fla at all); the assertions against it skip where it is absent.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from types import SimpleNamespace

import pytest

from deltaserve import fla_configs

triton = pytest.importorskip("triton")

KEY = (16, 32, 128, 128, 64, True, "torch.bfloat16", "torch.float32")
# fla 0.6's AutotuneKey.key_hash(KEY), computed by running fla's cache.py in the dev environment.
KEY_HASH = "4a003813135a2c8c6d0fea2d05436057"


def _fla_cache():
    """fla's cache module loaded by path, or None when fla-core is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = f"{root}/ops/utils/cache.py"
        try:
            s = importlib.util.spec_from_file_location("_fla_cache_under_test", path)
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
            return mod
        except FileNotFoundError:
            continue
    return None


@pytest.fixture(scope="module")
def fla_cache():
    mod = _fla_cache()
    if mod is None:
        pytest.skip("fla-core is not installed: no fla/ops/utils/cache.py to check against")
    return mod


def _config():
    return triton.Config({"BV": 64, "BK": 32}, num_warps=4, num_stages=3)


def test_config_to_entry():
    h, entry = fla_configs.autotune_entry(KEY, _config())
    assert entry["autotune_key"] == list(KEY)
    assert entry["config"] == {"kwargs": {"BV": 64, "BK": 32}, "num_warps": 4, "num_stages": 3,
                               "num_ctas": 1, "maxnreg": None}
    assert h == KEY_HASH == fla_configs.key_hash(list(KEY))
    json.dumps(entry)


def test_key_hash_matches_fla(fla_cache):
    assert fla_configs.key_hash(KEY) == fla_cache.AutotuneKey.key_hash(KEY)
    nested = (4, (1, 2), {"b": 1, "a": [3]}, None, 1.5)
    assert fla_configs.key_hash(nested) == fla_cache.AutotuneKey.key_hash(nested)
    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "  ", "AMD Instinct MI300X"):
        assert fla_configs.sanitize_gpu_name(name) == fla_cache.sanitize_gpu_name(name)


def test_unserialisable_key_is_skipped(tmp_path):
    tuner = SimpleNamespace(kernel_name="k", cache={(object(),): _config(), KEY: _config()})
    [path] = fla_configs.dump_fla_configs(tmp_path, [tuner], triton_version="3.6.0")
    assert list(json.loads(path.read_text())["autotune_entries"]) == [KEY_HASH]


def _dump(tmp_path, cache, name="chunk_fwd_kernel_o"):
    tuner = SimpleNamespace(kernel_name=name, cache=cache)
    return fla_configs.dump_fla_configs(tmp_path, [tuner], triton_version=triton.__version__)


def test_round_trip_plain_json(tmp_path):
    other = (8,) + KEY[1:]
    [path] = _dump(tmp_path, {KEY: _config(), other: triton.Config({"BV": 32}, num_warps=8, num_stages=2)})
    assert path == tmp_path / "chunk_fwd_kernel_o.json"
    data = json.loads(path.read_text())
    assert data["kernel_name"] == "chunk_fwd_kernel_o" and data["triton_version"] == triton.__version__
    assert data["fla_version"] == fla_configs.installed_fla_version()
    assert data["autotune_entries"][KEY_HASH]["config"]["kwargs"] == {"BV": 64, "BK": 32}
    assert data["autotune_entries"][fla_configs.key_hash(other)]["config"]["num_warps"] == 8
    # A later dump (another preset) adds to the file; a new tuning of a key replaces it.
    _dump(tmp_path, {KEY: triton.Config({"BV": 16}, num_warps=2, num_stages=1)})
    entries = json.loads(path.read_text())["autotune_entries"]
    assert len(entries) == 2 and entries[KEY_HASH]["config"]["kwargs"] == {"BV": 16}


def test_round_trip_through_fla(tmp_path, fla_cache, monkeypatch):
    [path] = _dump(tmp_path, {KEY: _config()})
    parsed = fla_cache.KernelConfigFile.from_file(path)
    assert parsed is not None
    entry = parsed.lookup_exact(fla_cache.AutotuneKey(autotune_key=KEY))
    assert entry is not None and entry["config"]["kwargs"] == {"BV": 64, "BK": 32}
    assert parsed.lookup_exact(fla_cache.AutotuneKey(autotune_key=(8,) + KEY[1:])) is None
    # fla's own lookup under the mode we set, and the triton.Config it rebuilds from the dict.
    monkeypatch.setenv("FLA_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", fla_cache.FlaCacheMode(fla_configs.CACHE_MODE))
    cfg = fla_cache.load_cached_config("chunk_fwd_kernel_o", fla_cache.AutotuneKey(autotune_key=KEY))
    assert cfg == fla_configs.config_to_dict(_config())
    rebuilt = triton.Config(cfg["kwargs"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                            num_ctas=cfg["num_ctas"], maxnreg=cfg.get("maxnreg"))
    assert fla_configs.config_to_dict(rebuilt) == cfg
    # strict: another shape is not served a config (fla autotunes it as before).
    other = fla_cache.AutotuneKey(autotune_key=(8,) + KEY[1:])
    assert fla_cache.load_cached_config("chunk_fwd_kernel_o", other) is None


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    for var in fla_configs.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(fla_configs, "SHIPPED_ROOT", tmp_path)
    monkeypatch.delitem(sys.modules, "fla.ops.utils.cache", raising=False)
    monkeypatch.setattr(fla_configs, "installed_fla_version", lambda: "0.6.0")
    d = tmp_path / "NVIDIA_H200"
    d.mkdir()
    (d / "chunk_fwd_kernel_o.json").write_text(json.dumps(fla_configs.kernel_file("chunk_fwd_kernel_o", {}, "3.6.0", "0.6.0")))
    return d


def test_use_shipped_sets_env(shipped, monkeypatch, caplog):
    import os

    with caplog.at_level(logging.INFO, logger="deltaserve.fla_configs"):
        assert fla_configs.use_shipped_fla_configs("NVIDIA H200") == shipped
    assert os.environ["FLA_CONFIG_DIR"] == str(shipped)
    assert os.environ["FLA_CACHE_MODE"] == "strict"
    assert "1 shipped autotune configs" in caplog.text
    assert fla_configs.use_shipped_fla_configs("NVIDIA H200") == shipped  # a TP rank inheriting them


@pytest.mark.parametrize("var,value", [("FLA_CACHE_MODE", "disabled"), ("FLA_CONFIG_DIR", "/mine")])
def test_use_shipped_respects_user(shipped, monkeypatch, var, value):
    import os

    monkeypatch.setenv(var, value)
    assert fla_configs.use_shipped_fla_configs("NVIDIA H200") is None
    assert os.environ[var] == value
    assert [v for v in fla_configs.ENV_VARS if v in os.environ] == [var]


def test_use_shipped_unknown_device(shipped):
    import os

    assert fla_configs.use_shipped_fla_configs("NVIDIA H100 80GB HBM3") is None
    assert fla_configs.use_shipped_fla_configs("") is None
    assert not any(v in os.environ for v in fla_configs.ENV_VARS)


def test_use_shipped_other_fla_version(shipped, monkeypatch):
    import os

    monkeypatch.setattr(fla_configs, "installed_fla_version", lambda: "0.7.0")
    assert fla_configs.use_shipped_fla_configs("NVIDIA H200") is None
    assert not any(v in os.environ for v in fla_configs.ENV_VARS)


def test_use_shipped_after_fla_import(shipped, monkeypatch, caplog):
    import os

    monkeypatch.setitem(sys.modules, "fla.ops.utils.cache", SimpleNamespace())
    with caplog.at_level(logging.WARNING, logger="deltaserve.fla_configs"):
        assert fla_configs.use_shipped_fla_configs("NVIDIA H200") is None
    assert "cannot take effect" in caplog.text
    assert not any(v in os.environ for v in fla_configs.ENV_VARS)


def test_find_fla_autotuners(monkeypatch):
    """Autotuners bound in fla modules, bare or under heuristics, split by whether fla reads configs."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    class CachedAutotuner(Autotuner):
        pass

    def fake(cls, name):
        t = cls.__new__(cls)
        t.fn = SimpleNamespace(__name__=name)
        t.base_fn = t.fn
        return t

    cached, plain = fake(CachedAutotuner, "cached_kernel"), fake(Autotuner, "plain_kernel")
    heur = Heuristics.__new__(Heuristics)
    heur.fn = cached
    monkeypatch.setitem(sys.modules, "fla.ops.utils.cache", SimpleNamespace(CachedAutotuner=CachedAutotuner))
    monkeypatch.setitem(sys.modules, "fla.ops.fake", SimpleNamespace(a=heur, b=plain, c=cached, d=3))
    monkeypatch.setitem(sys.modules, "notfla.ops", SimpleNamespace(e=fake(CachedAutotuner, "other")))
    found_cached, found_plain = fla_configs.find_fla_autotuners()
    assert [fla_configs.kernel_name(t) for t in found_cached] == ["cached_kernel"]
    assert plain in found_plain and cached not in found_plain
