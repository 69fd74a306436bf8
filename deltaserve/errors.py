"""Typed errors. Each names the offending value and, where there is one, the fix.

The server maps these to HTTP status codes in exactly one place (``server/errors.py``):
``InvalidRequestError`` and its subclasses -> 400, ``QueueFullError`` -> 429, the rest -> 500.
"""

from __future__ import annotations


class DeltaServeError(Exception):
    """Base class of every error deltaserve raises on purpose."""


class ConfigError(DeltaServeError, ValueError):
    """An engine option or model config is invalid (raised at start-up)."""


class CheckpointError(DeltaServeError):
    """A checkpoint cannot be loaded: missing/unexpected tensor, shape mismatch, corrupt file, bad config."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture is not one deltaserve implements."""


class InvalidRequestError(DeltaServeError, ValueError):
    """A client sent something invalid. ``param`` names the field when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context. The message contains 'maximum context length' and both counts."""

    def __init__(self, prompt_len: int, max_model_len: int, param: str = "prompt"):
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} prompt tokens. Please shorten the prompt.",
            param=param,
        )
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len


class QueueFullError(DeltaServeError):
    """Admission refused: too many requests are queued. The client should retry later."""


class EngineDeadError(DeltaServeError):
    """The engine loop died; no request can be served."""
