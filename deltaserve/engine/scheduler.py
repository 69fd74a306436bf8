"""FCFS scheduler with chunked prefill and recompute preemption.

Design note -- the invariant. Every request has ``num_tokens`` (prompt + generated) and
``num_computed`` (tokens whose KV entries and GDN state are in the caches). A step gives each
scheduled request ``n`` more tokens, so ``num_computed`` catches up with ``num_tokens``; when it
does, the step's sample becomes the request's next token. There is no separate "prefill" or
"decode" phase: a decode is simply ``n == 1``, a long prompt is a few steps of ``n < remaining``.

* A RUNNING request holds exactly one GDN state slot and KV blocks for ``num_computed`` tokens
  (plus this step's); a WAITING request holds nothing and has ``num_computed == 0``.
* Running requests are served first, in admission order, within the step's token budget; waiting
  requests are admitted FCFS while budget, a free state slot, ``max_num_seqs`` and KV blocks allow.
* When KV blocks run out, the most recently admitted running request is preempted: its blocks
  and slot are freed, ``num_computed`` drops to 0, and it goes to the front of the queue to be
  recomputed from its prompt and the tokens it already generated.
* GDN state cannot be rolled back, so a request's slot is never shared and never partially reused.

With async scheduling (``LLMEngine``) a step is scheduled while the previous one still runs: a
request's token from that step is *pending* (``Request.pending``; it counts in ``num_tokens``, its
value is read on the device), so the request simply decodes it next. One whose pending token is its
last (``max_tokens``) is not scheduled again. A slot or block freed while a launched step still
writes to it is safe to hand out: every later write is queued behind that step on the same stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from deltaserve.engine.kv_cache import KVCache
from deltaserve.engine.request import Request, Status
from deltaserve.engine.state_cache import StateCache


@dataclass
class Scheduled:
    request: Request
    num_tokens: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """Does this step's output become a new token (i.e. does the request catch up)?"""
        r = self.request
        return r.num_computed + self.num_tokens == r.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.request.num_computed > 0


class Scheduler:
    def __init__(self, kv: KVCache, states: StateCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv, self.states = kv, states
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget, out = self.budget, []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.pending and req.num_generated >= req.max_tokens:
                i += 1  # its in-flight token is its last: it finishes when that token lands
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._reserve_blocks(req, req.num_computed + n):
                preempted = True
                if req.status is not Status.RUNNING:  # it preempted itself: nothing left behind it
                    break
                continue  # a victim behind it was freed; retry this one
            out.append(Scheduled(req, n))
            budget -= n
            i += 1
        # Admit new work only when nothing had to be preempted this step (it would just be evicted again).
        while (self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
               and self.states.num_free > 0):
            req = self.waiting[0]
            n = min(req.num_tokens, budget)
            if self.kv.blocks_needed(n) > self.kv.num_free:
                break
            self.waiting.popleft()
            req.status, req.state_slot = Status.RUNNING, self.states.alloc()
            req.block_ids = self.kv.alloc(self.kv.blocks_needed(n))
            self.running.append(req)
            out.append(Scheduled(req, n))
            budget -= n
        out.sort(key=lambda s: not s.is_decode)  # stable: decodes first, then prefills (chunks)
        return out

    def _reserve_blocks(self, req: Request, num_tokens: int) -> bool:
        """Grow ``req``'s block table to hold ``num_tokens``, preempting from the back if needed."""
        need = self.kv.blocks_needed(num_tokens) - len(req.block_ids)
        while need > self.kv.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.block_ids += self.kv.alloc(need)
        return True

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status, req.num_computed = Status.WAITING, 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """Finish or abort ``req`` wherever it is; frees everything it holds."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        req.pending.clear()  # an in-flight step's row for it is dropped when it lands

    def _release(self, req: Request) -> None:
        self.kv.free(req.block_ids)
        req.block_ids = []
        if req.state_slot is not None:
            self.states.free(req.state_slot)
            req.state_slot = None
