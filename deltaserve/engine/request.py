"""A request inside the engine: its tokens, its place in the caches, and what it has produced."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from deltaserve.engine.detokenizer import IncrementalDetokenizer
from deltaserve.sampling import SamplingParams


def placeholder(row: int) -> int:
    """The input id standing for row ``row`` of the previous step's samples (token ids are >= 0)."""
    return -1 - row


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: capped to what fits in the context
    stop_ids: frozenset[int]  # EOS ids (unless ignore_eos) and stop_token_ids
    detok: IncrementalDetokenizer | None
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV / state are in the caches
    # Tokens sampled by a launched step that the host has not seen yet (async scheduling): for each, oldest
    # first, (that step's launch number, its row among the step's samples). They count in ``num_tokens``;
    # ``output_token_ids`` has only the tokens the host knows.
    pending: list[tuple[int, int]] = field(default_factory=list)
    state_slot: int | None = None
    block_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    emitted_tokens: int = 0  # output tokens already handed to the caller
    emitted_logprobs: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.pending)

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far, pending ones included."""
        return len(self.output_token_ids) + len(self.pending)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)``; a pending one reads as :func:`placeholder` of its row (the runner
        takes its value from the previous step's samples on the device)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids + [placeholder(r) for _, r in self.pending])[start:end]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestOutput:
    """A request's progress. Streaming callers read the ``delta_*`` fields; the rest is cumulative."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict] | None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict] = field(default_factory=list)
    metrics: dict | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
