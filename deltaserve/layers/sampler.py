"""Vectorised sampling over a batch: penalties, min_tokens, temperature, top-k, top-p, min-p, seeds.

All rows are processed with batched tensor ops on the logits' device; the only per-row work is
drawing noise for seeded rows from their own generators. Sampling uses the exponential race
(``argmax(p / q)``, ``q ~ Exp(1)``), which draws exactly one categorical sample per row with no
sort and no host sync, and lets a seeded row's noise depend only on its own generator: the same
seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.host import to_device
from deltaserve.sampling import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    token_history: list[int] | None  # prompt + output ids, only when a repetition penalty is set
    num_output: int  # tokens generated so far (for min_tokens)
    stop_ids: frozenset[int]
    generator: torch.Generator | None


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict] | None  # per row: {"token": id, "logprob": x, "top": [(id, logprob), ...]}, or None


class PendingSample:
    """One step's samples, still on the device. ``tokens`` feeds the next step's inputs without the host;
    :meth:`result` waits for the step and returns the host's copy (on CUDA, copied into pinned memory as
    soon as the sampler's kernels are queued, so waiting is all that is left)."""

    def __init__(self, tokens: torch.Tensor, logprob_parts: tuple[torch.Tensor, ...] = (),
                 logprob_counts: list[int | None] | None = None):
        self.tokens = tokens  # [B] int64, on the device
        self._counts = logprob_counts  # per row: the top-k asked for, or None for no logprobs
        parts = (tokens, *logprob_parts)
        self._event = None
        if tokens.is_cuda:
            parts = tuple(torch.empty(p.shape, dtype=p.dtype, pin_memory=True).copy_(p, non_blocking=True)
                          for p in parts)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(tokens.device))  # the copies' stream, whatever thread
        self._host = parts
        self._result: SampleResult | None = None

    def result(self) -> SampleResult:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            token_list = self._host[0].tolist()
            lp = None
            if self._counts is not None:
                chosen, top_v, top_i = (p.tolist() for p in self._host[1:])
                lp = [None if n is None else {"token": token_list[i], "logprob": chosen[i],
                                              "top": list(zip(top_i[i][:n], top_v[i][:n]))}
                      for i, n in enumerate(self._counts)]
            self._result = SampleResult(token_list, lp)
        return self._result


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> PendingSample:
        """logits ``[B, V]`` float32 (one row per entry of ``rows``) -> one token per row. Queues the work
        and returns at once: nothing here waits for the device."""
        B, V = logits.shape
        params = [r.params for r in rows]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = self._penalise(logits, rows)
        if all(p.greedy for p in params):
            tokens = logits.argmax(-1)
        else:
            greedy = to_device([p.greedy for p in params], torch.bool, self.device)
            temp = to_device([p.temperature if not p.greedy else 1.0 for p in params], torch.float32, self.device)
            probs = self._filter(torch.softmax(logits / temp[:, None], dim=-1), params)
            sampled = (probs / self._noise(B, V, rows)).argmax(-1)
            tokens = torch.where(greedy, logits.argmax(-1), sampled)
        if not want_logprobs:
            return PendingSample(tokens)
        k = max(p.logprobs or 0 for p in params)
        chosen = raw_logprobs.gather(-1, tokens[:, None])[:, 0]
        top_v, top_i = raw_logprobs.topk(k, dim=-1) if k else (raw_logprobs[:, :0], tokens[:, None][:, :0])
        return PendingSample(tokens, (chosen, top_v, top_i), [p.logprobs for p in params])

    def _penalise(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        B, V = logits.shape
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            seen = torch.zeros(B, V, dtype=torch.bool, device=self.device)
            for i, r in enumerate(rows):
                if r.params.repetition_penalty != 1.0 and r.token_history:
                    seen[i, to_device([t for t in r.token_history if t < V], torch.long, self.device)] = True
            pen = to_device([r.params.repetition_penalty for r in rows], torch.float32, self.device)[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        banned = [(i, t) for i, r in enumerate(rows) if r.num_output < r.params.min_tokens
                  for t in r.stop_ids if t < V]
        if banned:
            logits = logits.clone()
            rr, cc = zip(*banned)
            # index_put_ with a device tensor of values: assigning a Python float here waits for the device
            logits.index_put_((to_device(rr, torch.long, self.device), to_device(cc, torch.long, self.device)),
                              logits.new_full((len(rr),), float("-inf")))
        return logits

    def _filter(self, probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        V = probs.shape[1]
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], torch.float32, self.device)[:, None]
            probs = torch.where(probs < min_p * probs.max(-1, keepdim=True).values, 0.0, probs)
        if any(0 < p.top_k < V or p.top_p < 1.0 for p in params):
            sorted_p, order = probs.sort(-1, descending=True)
            top_k = to_device([p.top_k if 0 < p.top_k < V else V for p in params], torch.long, self.device)
            top_p = to_device([p.top_p for p in params], torch.float32, self.device)
            rank = torch.arange(V, device=self.device)[None]
            # Keep a token if it is within top-k and the mass before it is < top_p (the first always stays).
            mass_before = sorted_p.cumsum(-1) - sorted_p
            keep = (rank < top_k[:, None]) & (mass_before < top_p[:, None] * sorted_p.sum(-1, keepdim=True))
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
        return probs

    def _noise(self, B: int, V: int, rows: list[SampleRow]) -> torch.Tensor:
        q = torch.empty(B, V, device=self.device).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                q[i].exponential_(generator=r.generator)
        return q
