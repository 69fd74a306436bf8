"""deltaserve: a compact, fast inference engine for hybrid Gated-DeltaNet models (Qwen3.5, Qwen3-Next)."""

__version__ = "0.1.0"
