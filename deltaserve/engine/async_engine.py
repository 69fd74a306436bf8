"""AsyncEngine: the engine loop in one background thread, driven by asyncio callers.

Callers (the HTTP server) never touch tensors or the scheduler: they validate and tokenise a request
in their own thread (:meth:`LLMEngine.make_request` only reads the tokenizer and config), then post
typed messages -- ``Add``, ``Abort`` -- to the loop's inbox. The loop applies messages only between
steps, so an abort never lands mid-forward, and it streams each request's outputs back to the
caller's event loop. If the loop dies, every open stream gets :class:`EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from deltaserve.config import EngineConfig
from deltaserve.engine.engine import LLMEngine
from deltaserve.engine.request import Request, RequestOutput
from deltaserve.errors import EngineDeadError, InvalidRequestError, QueueFullError
from deltaserve.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class Add:
    request: Request
    loop: asyncio.AbstractEventLoop
    stream: asyncio.Queue


@dataclass
class Abort:
    request_id: str


@dataclass
class Stop:
    pass


def loop_device_index(device: torch.device) -> int | None:
    """The GPU index the engine loop thread makes current (None off CUDA): the engine's own, or for an
    index-less ``cuda`` the one current in the thread that built the engine, where its tensors live.
    ``torch.cuda.set_device`` refuses a bare ``cuda`` device."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class AsyncEngine:
    def __init__(self, cfg: EngineConfig, max_queued_requests: int | None = None, log_interval: float = 10.0,
                 on_finish: Callable[[RequestOutput], None] | None = None):
        self.engine = LLMEngine(cfg)
        self.tokenizer = self.engine.tokenizer
        self.max_queued = max_queued_requests
        self.log_interval = log_interval
        self.on_finish = on_finish
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._unfinished = 0
        self._lock = threading.Lock()
        self.dead: BaseException | None = None
        self._cuda_index = loop_device_index(self.engine.runner.device)
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine", daemon=True)
        self._last_log, self._last_stats = time.monotonic(), dict(self.engine.stats)
        self._usage = self.engine.usage()

    def start(self) -> None:
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def usage(self) -> dict:
        """Last snapshot taken by the loop (safe to read from any thread)."""
        return dict(self._usage)

    @property
    def num_unfinished(self) -> int:
        return self._unfinished

    # -- caller side ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iteration early (client gone) aborts the request."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has died: {self.dead!r}")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight", "request_id")
        req = self.engine.make_request(prompt, params, request_id)
        with self._lock:
            limit = self.engine.cfg.max_num_seqs + (self.max_queued if self.max_queued is not None else 10**9)
            if self._unfinished >= limit:
                raise QueueFullError(f"{self._unfinished} requests are in flight (max_num_seqs="
                                     f"{self.engine.cfg.max_num_seqs} + max_queued_requests={self.max_queued}); "
                                     f"retry later")
            self._unfinished += 1
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._inbox.put(Add(req, asyncio.get_running_loop(), stream))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop thread, then the engine (and its tensor-parallel workers)."""
        self._inbox.put(Stop())
        self._thread.join(timeout)
        self.engine.shutdown()

    # -- loop side --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._cuda_index is not None:  # a thread starts on GPU 0: make the engine's GPU its current one
                torch.cuda.set_device(self._cuda_index)
            while True:
                block = not self.engine.has_unfinished()
                if not self._drain(block):
                    return
                for out in self.engine.step():
                    self._deliver(out)
                self._usage = self.engine.usage()
                self._maybe_log()
        except BaseException as e:  # noqa: BLE001 - anything that kills the loop must reach the callers
            logger.exception("engine loop died")
            self.dead = e
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, EngineDeadError(f"the engine loop has died: {e!r}"))

    def _drain(self, block: bool) -> bool:
        """Apply every pending message; wait for one first when idle. False: stop the loop."""
        while True:
            try:
                msg = self._inbox.get(block=block, timeout=1.0 if block else None)
            except queue.Empty:
                if block:
                    self._usage = self.engine.usage()
                    self._maybe_log()
                    if not self.engine.has_unfinished():
                        continue
                return True
            block = False
            if isinstance(msg, Stop):
                return False
            if isinstance(msg, Add):
                try:
                    self.engine.add_request(msg.request)
                except InvalidRequestError as e:  # a bad request fails alone; the loop keeps serving
                    self._streams.pop(msg.request.request_id, None)
                    with self._lock:
                        self._unfinished -= 1
                    msg.loop.call_soon_threadsafe(msg.stream.put_nowait, e)
            elif isinstance(msg, Abort):
                out = self.engine.abort(msg.request_id)
                if out is not None:
                    self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if out.finished:
            self._streams.pop(out.request_id, None)
            with self._lock:
                self._unfinished -= 1
            if self.on_finish is not None:
                self.on_finish(out)
        if entry is not None:
            loop, stream = entry
            loop.call_soon_threadsafe(stream.put_nowait, out)

    def _maybe_log(self) -> None:
        now = time.monotonic()
        dt = now - self._last_log
        if dt < self.log_interval:
            return
        s, last = self.engine.stats, self._last_stats
        u = self._usage
        if s == last and not (u["running"] or u["waiting"]):
            self._last_log = now
            return  # idle since the last line: say nothing (as vLLM does)
        logger.info(
            "engine: running %d, waiting %d, KV %.1f%%, state slots %.1f%%, prompt %.1f tok/s, generation %.1f tok/s",
            u["running"], u["waiting"], 100 * (1 - u["kv_free"] / u["kv_total"]),
            100 * (1 - u["slots_free"] / u["slots_total"]),
            (s["prompt_tokens"] - last["prompt_tokens"]) / dt, (s["generation_tokens"] - last["generation_tokens"]) / dt)
        self._last_log, self._last_stats = now, dict(s)
