"""Many engine requests as one HTTP response, and the plumbing that aborts them when the client leaves.

* :class:`MergedStream` runs the engine requests of one HTTP request (``n`` choices, or several
  completion prompts) as ``<id>-<i>`` and merges their outputs into one stream of ``(index, output)``.
  :meth:`MergedStream.start` returns only once every sub-request was admitted, or raises the first
  admission error (invalid prompt, queue full) with nothing left running -- so those errors become HTTP
  status codes, never half-started streams.
* :class:`SSEResponse` always watches for the client's disconnect (whatever ASGI spec version the server
  speaks) and closes the body generator deterministically, which aborts its engine requests at once.
* :func:`until_disconnected` does the same for non-streamed responses.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.engine.request import RequestOutput
from deltaserve.sampling import SamplingParams

DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class MergedStream:
    def __init__(self, engine: AsyncEngine, jobs: list[tuple[str | list[int], SamplingParams]], request_id: str,
                 on_itl: Callable[[float], None] | None = None,
                 registry: set[MergedStream] | None = None):
        self.engine, self.jobs, self.request_id = engine, jobs, request_id
        self.on_itl = on_itl
        self.registry = registry  # the server's set of live streams (drain aborts them)
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._finished: set[int] = set()
        self._started = False
        self.final: list[RequestOutput | None] = [None] * len(jobs)

    def sub_id(self, i: int) -> str:
        return f"{self.request_id}-{i}"

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(i, p, sp)) for i, (p, sp) in enumerate(self.jobs)]
        # One loop turn runs every pump up to its first await: generate() has either posted its request
        # to the engine by then or raised (validation, queue full) and finished its task. Nothing else
        # can run in between: engine outputs arrive through callbacks queued behind this turn.
        await asyncio.sleep(0)
        errors = [t.result() for t in self._tasks if t.done() and t.result() is not None]
        self._started = True
        if errors:
            await self.close()
            raise errors[0]
        if self.registry is not None:
            self.registry.add(self)

    async def _pump(self, i: int, prompt: str | list[int], params: SamplingParams) -> BaseException | None:
        last, produced = None, False
        try:
            async for out in self.engine.generate(prompt, params, self.sub_id(i)):
                now = time.monotonic()
                if out.delta_token_ids:
                    if last is not None and self.on_itl is not None:
                        self.on_itl(now - last)
                    last = now
                self._queue.put_nowait((i, out))
                produced = True
        except Exception as e:  # noqa: BLE001 - the consumer maps it to an error body
            if not self._started and not produced:
                return e  # refused at admission: start() raises it
            self._queue.put_nowait((i, e))
        return None

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while len(self._finished) < len(self.jobs):
            i, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self._finished.add(i)
                self.final[i] = item
            yield i, item

    async def collect(self) -> list[RequestOutput]:
        """Every sub-request's final output, by index (non-streamed responses)."""
        async for _ in self:
            pass
        return [o for o in self.final if o is not None]

    def abort(self) -> None:
        """Abort every unfinished sub-request; their streams then end with finish_reason "abort"."""
        for i in range(len(self.jobs)):
            if i not in self._finished:
                self.engine.abort(self.sub_id(i))

    async def close(self) -> None:
        """Idempotent. Cancelling a pump closes its generate(), whose ``finally`` aborts the request."""
        if self.registry is not None:
            self.registry.discard(self)
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # Shielded: this runs while an anyio scope is cancelling us (client gone), where an unshielded
            # await would be cancelled again before the pumps have posted their aborts.
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*self._tasks, return_exceptions=True)


class SSEResponse(StreamingResponse):
    """``text/event-stream`` that aborts its work the moment the client goes away."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-send
                        pass
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            # Starlette leaves a generator suspended at a ``yield`` open; close it now, not at GC time.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it (and raising :class:`ClientGone`) if the client disconnects first.

    The body has been read already, so the next ASGI message can only be ``http.disconnect``.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def collect_final(request: Request, stream: MergedStream) -> list[RequestOutput] | None:
    """Every choice's final output for a non-streamed response; None if the client left (request aborted)."""
    try:
        return await until_disconnected(request, stream.collect())
    except ClientGone:
        return None
    finally:
        await stream.close()
