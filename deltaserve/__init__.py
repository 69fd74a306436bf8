"""deltaserve: a compact, fast inference engine for hybrid Gated-DeltaNet models (Qwen3.5, Qwen3-Next)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]


def __getattr__(name: str):
    # Lazy: `import deltaserve` stays cheap (the CLI imports torch only when it needs it).
    if name == "LLM":
        from deltaserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from deltaserve.sampling import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from deltaserve.config import EngineConfig

        return EngineConfig
    if name == "RequestOutput":
        from deltaserve.engine.request import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'deltaserve' has no attribute {name!r}")
