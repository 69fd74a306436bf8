"""fla-core's autotune configs: record the ones its autotuners picked, ship them per GPU, point fla at them.

fla 0.6 decorates most of its chunked kernels with ``fla_cache_autotune`` (``fla/ops/utils/cache.py``):
a Triton ``Autotuner`` that, before autotuning a new key, looks the key up in
``$FLA_CONFIG_DIR/{kernel_name}.json``. The file holds ``autotune_entries``:
``{md5(key as sorted compact JSON): {"autotune_key": [...], "config": {"kwargs", "num_warps",
"num_stages", "num_ctas", "maxnreg"}}}``; the key is Triton's own autotune key (the values of the
kernel's ``key=`` arguments, then ``str(dtype)`` of every tensor argument), so an entry recorded from
``autotuner.cache`` is found again by exactly the same call. Lookups are off unless ``FLA_CACHE_MODE``
is set, and fla reads that variable once, when ``fla.ops.utils.cache`` is imported (``FLA_CONFIG_DIR``
is read at each lookup).

We use ``strict``: an exact key match compiles that one config, any other key autotunes as before.
(``fuzzy`` would hand a config tuned for other head counts or dims to any key of the same structure.)
Kernels fla still decorates with plain ``triton.autotune`` (``solve_tril``, ``chunk_scaled_dot_kkt``,
some cumsum and l2norm kernels in 0.6) never consult the files and keep autotuning.

:func:`dump_fla_configs` writes the files (``scripts/dump_fla_configs.py`` runs it after an engine's
start-up on the device); :func:`use_shipped_fla_configs` points fla at ``configs/fla/<GPU>/`` before
fla is first imported (``ModelRunner`` calls it on CUDA).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Where the per-GPU directories are shipped (a module attribute so tests can point it elsewhere).
SHIPPED_ROOT = Path(__file__).parent / "configs" / "fla"
CACHE_MODE = "strict"
ENV_VARS = ("FLA_CONFIG_DIR", "FLA_CACHE_MODE")
_FLA_CACHE_MODULE = "fla.ops.utils.cache"  # reads FLA_CACHE_MODE when imported


# -- fla's key and file format (mirrors fla/ops/utils/cache.py; tests check against it) -----------------
def sanitize_gpu_name(gpu_name: str) -> str:
    """fla's ``sanitize_gpu_name``: ``"NVIDIA H200"`` -> ``"NVIDIA_H200"``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", gpu_name).strip("_") or "unknown_gpu"


def normalize_key(value: Any) -> Any:
    """fla's ``AutotuneKey.normalize_autotune_key``: tuples become lists, recursively."""
    if isinstance(value, (list, tuple)):
        return [normalize_key(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize_key(v) for k, v in value.items()}
    return value


def key_hash(key: Any) -> str:
    """fla's ``AutotuneKey.key_hash``: md5 of the key as compact, key-sorted JSON."""
    text = json.dumps(normalize_key(key), separators=(",", ":"), sort_keys=True)
    return hashlib.md5(text.encode()).hexdigest()


def config_to_dict(config: Any) -> dict[str, Any]:
    """A ``triton.Config`` as the ``config`` dict fla rebuilds one from (it requires ``num_ctas`` on
    Triton >= 3.5.1). Per-config pre-hooks are not kept: fla rebuilds every cached config without one."""
    d = {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
         "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}
    if getattr(config, "ir_override", None) is not None:
        d["ir_override"] = config.ir_override
    return d


def autotune_entry(key: Any, config: Any) -> tuple[str, dict[str, Any]]:
    """``(hash, entry)`` of one ``autotuner.cache`` item; raises TypeError/ValueError if the key or the
    config is not plain JSON."""
    entry = {"autotune_key": normalize_key(key), "config": config_to_dict(config)}
    json.dumps(entry)  # fail here, not half-way through writing a file
    return key_hash(key), entry


def kernel_file(kernel_name: str, entries: dict[str, dict], triton_version: str | None,
                fla_version: str | None = None) -> dict[str, Any]:
    """The ``{kernel_name}.json`` document (``default_config`` is only read in fla's full/default modes;
    ``fla_version`` is ours, fla ignores it: a config's kwargs name one fla version's constexprs)."""
    return {"kernel_name": kernel_name, "triton_version": triton_version, "fla_version": fla_version,
            "autotune_entries": dict(sorted(entries.items())), "default_config": None}


def installed_fla_version() -> str | None:
    """fla-core's version from its package metadata, without importing fla."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


# -- finding the autotuners that ran ----------------------------------------------------------------------
def kernel_name(autotuner: Any) -> str:
    """The name fla files a kernel under (``CachedAutotuner.kernel_name``), or the jitted function's."""
    name = getattr(autotuner, "kernel_name", None)
    if name:
        return name
    base = getattr(autotuner, "base_fn", None) or getattr(autotuner, "fn", None)
    return getattr(base, "__name__", None) or type(autotuner).__name__


def find_fla_autotuners() -> tuple[list[Any], list[Any]]:
    """``(cached, plain)``: the Triton autotuners bound in fla's imported modules, split into those fla
    looks configs up for (its ``CachedAutotuner``) and plain ``triton.autotune`` ones. fla keeps no
    registry: kernels are module globals, possibly wrapped in ``triton.heuristics`` (followed via ``.fn``)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    cache_mod = sys.modules.get(_FLA_CACHE_MODULE)
    cached_cls = getattr(cache_mod, "CachedAutotuner", None)
    found: dict[int, Any] = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "fla" or name.startswith("fla.")):
            continue
        for value in list(vars(mod).values()):
            for _ in range(4):  # heuristics -> autotune -> heuristics -> jit at the most
                if isinstance(value, Autotuner):
                    found[id(value)] = value
                    break
                if not isinstance(value, KernelInterface):
                    break
                value = getattr(value, "fn", None)
    tuners = sorted(found.values(), key=kernel_name)
    cached = [t for t in tuners if cached_cls is not None and isinstance(t, cached_cls)]
    return cached, [t for t in tuners if t not in cached]


# -- writing -----------------------------------------------------------------------------------------------
def _existing_entries(path: Path, triton_version: str | None) -> dict[str, dict]:
    """Entries of an earlier dump (another preset, TP size) to keep, if it was made with this Triton."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("autotune_entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or data.get("triton_version") != triton_version:
        return {}
    return {h: e for h, e in entries.items() if isinstance(e, dict) and isinstance(e.get("config"), dict)}


def dump_fla_configs(out_dir: str | Path, autotuners: list[Any] | None = None,
                     triton_version: str | None = None) -> list[Path]:
    """Write ``out_dir/{kernel_name}.json`` in fla's schema with every ``key -> best config`` the
    autotuners hold (default: fla's caching autotuners in this process), merged into the entries of
    an existing file of the same Triton version. Returns the files written."""
    if autotuners is None:
        autotuners, plain = find_fla_autotuners()
        if plain:
            logger.info("not dumped (plain triton.autotune, fla never reads configs for them): %s",
                        ", ".join(sorted({kernel_name(t) for t in plain})))
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    by_kernel: dict[str, dict[str, dict]] = {}
    conflicts: dict[str, set[str]] = {}
    for tuner in autotuners:
        name = kernel_name(tuner)
        entries = by_kernel.setdefault(name, {})
        for key, config in dict(getattr(tuner, "cache", {}) or {}).items():
            try:
                h, entry = autotune_entry(key, config)
            except (TypeError, ValueError) as e:
                logger.warning("%s: key %r not written (%s)", name, key, e)
                continue
            if h in entries and entries[h] != entry:  # two kernels of one name, one key: keep neither
                conflicts.setdefault(name, set()).add(h)
            entries[h] = entry
    out = Path(out_dir)
    written = []
    for name, entries in sorted(by_kernel.items()):
        for h in conflicts.get(name, ()):
            logger.warning("%s: key %s tuned differently by two kernels of that name; left to autotune",
                           name, entries.pop(h)["autotune_key"])
        if not entries:
            continue
        path = out / f"{name}.json"
        merged = {**_existing_entries(path, triton_version), **entries}
        out.mkdir(parents=True, exist_ok=True)
        doc = kernel_file(name, merged, triton_version, installed_fla_version())
        path.write_text(json.dumps(doc, indent=1) + "\n")
        written.append(path)
    return written


# -- using shipped configs ---------------------------------------------------------------------------------
def _recorded_fla_version(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("fla_version") if isinstance(data, dict) else None


def use_shipped_fla_configs(device_name: str) -> Path | None:
    """Point fla at ``SHIPPED_ROOT/<sanitised device_name>/`` (``FLA_CONFIG_DIR``, ``FLA_CACHE_MODE=strict``)
    if the repo ships JSON files for this GPU, recorded with the installed fla version. Does nothing
    when the user set either variable, or when fla's cache module is already imported (it has read
    ``FLA_CACHE_MODE`` by then). Returns the directory fla will read, or None."""
    directory = SHIPPED_ROOT / sanitize_gpu_name(device_name)
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not files:
        return None
    if os.environ.get("FLA_CONFIG_DIR") == str(directory) and os.environ.get("FLA_CACHE_MODE") == CACHE_MODE:
        return directory  # already set, e.g. inherited from the process that started this TP rank
    user_set = [v for v in ENV_VARS if v in os.environ]
    if user_set:
        logger.info("fla: %s set by the user; the %d shipped autotune configs for %s are not used",
                    " and ".join(user_set), len(files), device_name)
        return None
    installed = installed_fla_version()
    recorded = sorted({_recorded_fla_version(f) for f in files} - {installed})
    if recorded:
        logger.info("fla: the shipped autotune configs for %s were recorded with fla %s, this is fla %s; not used",
                    device_name, ", ".join(map(str, recorded)), installed)
        return None
    if _FLA_CACHE_MODULE in sys.modules:
        logger.warning("fla: imported before start-up set FLA_CACHE_MODE; the %d shipped autotune configs "
                       "for %s cannot take effect", len(files), device_name)
        return None
    os.environ["FLA_CONFIG_DIR"] = str(directory)
    os.environ["FLA_CACHE_MODE"] = CACHE_MODE
    logger.info("fla: %d shipped autotune configs for %s (FLA_CONFIG_DIR=%s, FLA_CACHE_MODE=%s)",
                len(files), device_name, directory, CACHE_MODE)
    return directory
