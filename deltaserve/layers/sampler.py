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


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
        """logits ``[B, V]`` float32 (one row per entry of ``rows``) -> one token per row."""
        B, V = logits.shape
        params = [r.params for r in rows]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = self._penalise(logits, rows)
        if all(p.greedy for p in params):
            tokens = logits.argmax(-1)
        else:
            greedy = torch.tensor([p.greedy for p in params], device=self.device)
            temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=self.device)
            probs = self._filter(torch.softmax(logits / temp[:, None], dim=-1), params)
            sampled = (probs / self._noise(B, V, rows)).argmax(-1)
            tokens = torch.where(greedy, logits.argmax(-1), sampled)
        token_list = tokens.tolist()
        lp = self._logprobs(raw_logprobs, tokens, token_list, params) if want_logprobs else None
        return SampleResult(token_list, lp)

    def _penalise(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        B, V = logits.shape
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            seen = torch.zeros(B, V, dtype=torch.bool, device=self.device)
            for i, r in enumerate(rows):
                if r.params.repetition_penalty != 1.0 and r.token_history:
                    ids = torch.tensor([t for t in r.token_history if t < V], dtype=torch.long)
                    seen[i, ids.to(self.device)] = True
            pen = torch.tensor([r.params.repetition_penalty for r in rows], device=self.device)[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        banned = [(i, t) for i, r in enumerate(rows) if r.num_output < r.params.min_tokens
                  for t in r.stop_ids if t < V]
        if banned:
            logits = logits.clone()
            rr, cc = zip(*banned)
            logits[torch.tensor(rr, device=self.device), torch.tensor(cc, device=self.device)] = float("-inf")
        return logits

    def _filter(self, probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        V = probs.shape[1]
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=self.device)[:, None]
            probs = torch.where(probs < min_p * probs.max(-1, keepdim=True).values, 0.0, probs)
        if any(0 < p.top_k < V or p.top_p < 1.0 for p in params):
            sorted_p, order = probs.sort(-1, descending=True)
            top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=self.device)
            top_p = torch.tensor([p.top_p for p in params], device=self.device)
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

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, token_list: list[int],
                  params: list[SamplingParams]) -> list[dict]:
        k = max(p.logprobs or 0 for p in params)
        chosen = raw.gather(-1, tokens[:, None])[:, 0].tolist()
        top_v, top_i = raw.topk(k, dim=-1) if k else (None, None)
        top_v = top_v.tolist() if k else None
        top_i = top_i.tolist() if k else None
        out = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            n = p.logprobs
            top = list(zip(top_i[i][:n], top_v[i][:n])) if n else []
            out.append({"token": token_list[i], "logprob": chosen[i], "top": top})
        return out
