"""LLMEngine: requests in, tokens out. One step is ``schedule -> launch -> land``.

With async scheduling the landing of step t happens after step t+1 is launched: the host's bookkeeping
(detokenising, stop checks, streaming) and the next step's scheduling and input copies run while the GPU
computes, instead of between two GPU steps. Step t+1 reads step t's tokens on the device (placeholders,
``Request.pending``), so the only cost is that a request stopping on a token or a stop string has
already been given one more row, which is dropped.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deltaserve.config import EngineConfig
from deltaserve.engine.detokenizer import IncrementalDetokenizer
from deltaserve.engine.request import Request, RequestOutput, Status
from deltaserve.engine.runner import ModelRunner
from deltaserve.engine.scheduler import Scheduled, Scheduler
from deltaserve.errors import CheckpointError, InvalidRequestError, PromptTooLongError
from deltaserve.layers.sampler import PendingSample
from deltaserve.sampling import SamplingParams
from deltaserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def resolve_model_dir(model: str | None) -> Path:
    if model is None:
        from deltaserve.models.make_model import demo_model_dir

        return demo_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise CheckpointError(f"model {model!r}: no such directory. Pass an HF checkpoint directory (config.json, "
                              "*.safetensors, tokenizer files; `deltaserve make-model` writes one), or leave MODEL "
                              "out for the built-in demo model (the hub is not used)")
    return path


@dataclass
class _Launched:
    """A step on the device: its launch number, the requests of its sampled rows in row order, their samples."""

    number: int
    requests: list[Request]
    sample: PendingSample


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model)
        self.tokenizer = Tokenizer(self.model_dir)
        if cfg.tensor_parallel_size > 1:
            from deltaserve.engine.tp import TPExecutor

            self.runner = TPExecutor(cfg, self.model_dir)
        else:
            self.runner = ModelRunner(cfg, self.model_dir)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.scheduler = Scheduler(self.runner.kv, self.runner.states, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
        self.async_scheduling = cfg.async_scheduling
        self._inflight: _Launched | None = None  # async scheduling: the launched step not yet landed
        self._launches = 0
        if self.async_scheduling:
            logger.info("async scheduling: each step is scheduled and launched while the previous one runs")

    # -- requests ------------------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate and tokenise; raises InvalidRequestError / PromptTooLongError naming the problem."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty: send at least one token of text", "prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})",
                                          "prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty: send at least one token", "prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.model_config.eos_token_ids)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed % 2**63)
        rid = request_id or f"req-{next(self._ids)}"
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens,
                                       params.include_stop_str_in_output)
        return Request(rid, ids, params, max_tokens, frozenset(stop_ids), detok, prompt=text, generator=gen)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use", "request_id")
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request in any state; frees its KV blocks and state slot at once."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return None
        self.scheduler.finish(req, "abort")
        req.finish_time = time.monotonic()
        return self._output(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (a no-op for a single process)."""
        self.runner.shutdown()

    # -- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step that landed.

        Synchronous: the step launched now, once it is done. With async scheduling: the step launched by
        the previous call, handled while this call's step runs on the device (its decodes read the
        previous step's tokens there). Aborts and new requests between calls take effect at the next
        schedule either way."""
        if self.cfg.debug_step_delay_ms:
            time.sleep(self.cfg.debug_step_delay_ms / 1000)
        outputs = []
        prev, self._inflight = self._inflight, None
        if prev is not None and (not self.async_scheduling or any(
                r.params.repetition_penalty != 1.0 and not r.finished for r in prev.requests)):
            # Synchronous (async scheduling turned off with a step in flight), or the penalty needs every
            # token of the history on the host: land it before scheduling.
            outputs += self._land(prev)
            prev = None
        scheduled = self.scheduler.schedule()
        if scheduled:
            try:
                step = self._launch(scheduled, prev)
            except BaseException:
                self._inflight = prev  # still on the device: the next step lands it
                raise
            if self.async_scheduling:
                self._inflight = step
            else:
                outputs += self._land(step)
        if prev is not None:
            outputs += self._land(prev)
        if self._inflight is not None and all(r.finished for r in self._inflight.requests):
            self._inflight = None  # nothing of it will be delivered: no need to wait for it
        return outputs

    def _launch(self, scheduled: list[Scheduled], prev: _Launched | None) -> _Launched:
        """Queue ``scheduled`` on the device and move its requests past it: their computed tokens count
        at once and each sampled token is pending (a placeholder for the next step) until it lands."""
        samples = [s.samples for s in scheduled]  # before num_computed moves
        sample = self.runner.launch(scheduled, prev.sample if prev is not None else None)
        self._launches += 1
        now, requests = time.monotonic(), []
        for s, sampled in zip(scheduled, samples):
            req = s.request
            req.first_scheduled_time = req.first_scheduled_time or now
            req.num_computed += s.num_tokens
            if req.num_computed <= len(req.prompt_token_ids):
                self.stats["prompt_tokens"] += s.num_tokens
            if sampled:
                req.pending.append((self._launches, len(requests)))
                requests.append(req)
        return _Launched(self._launches, requests, sample)

    def _land(self, step: _Launched) -> list[RequestOutput]:
        """Wait for ``step``'s tokens and hand them to their requests. A request that finished or was aborted
        after the launch drops its row."""
        result = step.sample.result()
        now, outputs = time.monotonic(), []
        for row, req in enumerate(step.requests):
            if req.finished:
                continue
            if not req.pending or req.pending[0] != (step.number, row):
                raise RuntimeError(f"request {req.request_id}: row {row} of step {step.number} lands out of order "
                                   f"(pending (step, row): {req.pending})")
            req.pending.pop(0)
            self._append(req, result.token_ids[row], result.logprobs[row] if result.logprobs else None, now)
            outputs.append(self._output(req))
        return outputs

    def _append(self, req: Request, token: int, logprob: dict | None, now: float) -> None:
        req.output_token_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        self.stats["generation_tokens"] += 1
        req.first_token_time = req.first_token_time or now
        req.last_token_time = now
        n = len(req.output_token_ids)
        reason = None
        if token in req.stop_ids:  # the sampler bans stop ids until min_tokens are out
            reason = "stop"
        elif req.detok is not None and token not in req.stop_ids and req.detok.add(token):
            reason = "stop"
        elif n >= req.max_tokens or len(req.prompt_token_ids) + n >= self.max_model_len:
            reason = "length"
        if reason:
            self.scheduler.finish(req, reason)
            req.finish_time = now
            self.requests.pop(req.request_id, None)

    def _output(self, req: Request) -> RequestOutput:
        finished = req.finished
        new_ids = req.output_token_ids[req.emitted_tokens :]
        new_lp = req.logprobs[req.emitted_logprobs :]
        req.emitted_tokens, req.emitted_logprobs = len(req.output_token_ids), len(req.logprobs)
        delta = req.detok.delta(finished) if req.detok else ""
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            text=req.detok.text[: req.detok.emitted] if req.detok else "", token_ids=list(req.output_token_ids),
            finish_reason=req.finish_reason, logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            delta_text=delta, delta_token_ids=new_ids, delta_logprobs=new_lp, metrics=self._metrics(req),
        )

    @staticmethod
    def _metrics(req: Request) -> dict | None:
        if not req.finished:
            return None
        t0 = req.arrival_time
        return {
            "ttft": (req.first_token_time - t0) if req.first_token_time else None,
            "e2e": (req.finish_time or time.monotonic()) - t0,
            "queue": (req.first_scheduled_time - t0) if req.first_scheduled_time else None,
            "prompt_tokens": len(req.prompt_token_ids),
            "completion_tokens": len(req.output_token_ids),
            "preemptions": req.num_preemptions,
        }

    # -- introspection (metrics, tests) --------------------------------------------------------------
    def usage(self) -> dict:
        kv, st = self.runner.kv, self.runner.states
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "kv_free": kv.num_free, "kv_total": kv.num_blocks, "slots_free": st.num_free, "slots_total": st.num_slots,
            "preemptions": self.scheduler.num_preemptions,
        }

    def status(self, req_id: str) -> Status | None:
        req = self.requests.get(req_id)
        return req.status if req else None
