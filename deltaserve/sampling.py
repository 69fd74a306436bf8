"""SamplingParams: how one request turns logits into tokens and when it stops.

Semantics follow vLLM: temperature 0 is greedy; ``top_k`` <= 0 and ``top_p`` = 1 disable those
filters; ``max_tokens=None`` means "as many as fit in the context"; a ``max_tokens`` beyond the
context is capped to what fits (the request then finishes with ``length``). ``logprobs=k`` returns the
chosen token's log-probability and the k most likely alternatives, computed from the model's raw
distribution (before temperature, penalties and filters), as vLLM does by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deltaserve.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._number("temperature", self.temperature, lo=0.0)
        self._number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        self._number("min_p", self.min_p, lo=0.0, hi=1.0)
        self._number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        self._integer("n", self.n, lo=1)
        self._integer("top_k", self.top_k, lo=-1)
        self._integer("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None:
            self._integer("max_tokens", self.max_tokens, lo=1)
            if self.min_tokens > self.max_tokens:
                raise InvalidRequestError(
                    f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}", "min_tokens")
        if self.seed is not None:
            self._integer("seed", self.seed, lo=-(2**63))
        if self.logprobs is not None:
            self._integer("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop={self.stop!r}: every stop string must be a non-empty string", "stop")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidRequestError(f"stop_token_ids={self.stop_token_ids!r}: ids must be integers >= 0",
                                          "stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @staticmethod
    def _number(name, value, lo=None, hi=None, lo_open=False) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            raise InvalidRequestError(f"{name}={value!r} must be a finite number", name)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            raise InvalidRequestError(f"{name}={value!r} must be {bound}" + (f" and <= {hi}" if hi is not None else ""),
                                      name)
        if hi is not None and value > hi:
            raise InvalidRequestError(f"{name}={value!r} must be <= {hi}", name)

    @staticmethod
    def _integer(name, value, lo=None, hi=None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"{name}={value!r} must be an integer", name)
        if lo is not None and value < lo:
            raise InvalidRequestError(f"{name}={value!r} must be >= {lo}", name)
        if hi is not None and value > hi:
            raise InvalidRequestError(f"{name}={value!r} must be <= {hi}", name)
