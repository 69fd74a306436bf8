"""The FastAPI app: routes, admission (loading / ready / draining / dead), auth, body limits, drain.

``build_app(engine, served_model_name, api_key)`` returns the app; ``engine=None`` builds it in the
*loading* state (every route but /health, /metrics and /version answers 503) until
``app.state.server.attach(engine)`` -- so the CLI can listen, and answer /health, while the model loads.
Request handlers live in ``chat.py`` and ``completions.py``; errors become bodies in ``errors.py`` only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import deltaserve
from deltaserve.engine.async_engine import AsyncEngine
from deltaserve.engine.request import RequestOutput
from deltaserve.errors import EngineDeadError
from deltaserve.sampling import SamplingParams
from deltaserve.server.errors import ApiError, error_body, error_response, install_error_handlers
from deltaserve.server.logging import log_finished
from deltaserve.server.logprobs import TokenTexts
from deltaserve.server.metrics import ServerMetrics
from deltaserve.server.protocol import ModelCard, ModelList
from deltaserve.server.streaming import MergedStream

logger = logging.getLogger(__name__)
DEFAULT_MAX_REQUEST_BYTES = 1 << 20


class ServerState:
    """What the routes share: the engine (once loaded), the admission state and the live streams."""

    def __init__(self, served_model_name: str, api_key: str | None, max_request_bytes: int,
                 model_root: str | None = None):
        self.model_name, self.api_key = served_model_name, api_key
        self.max_request_bytes, self.model_root = max_request_bytes, model_root
        self.engine: AsyncEngine | None = None
        self.load_error: BaseException | None = None  # set by the CLI when the model failed to load
        self.texts: TokenTexts | None = None
        self.draining = False
        self.created = int(time.time())
        self.streams: set[MergedStream] = set()
        self.metrics = ServerMetrics(served_model_name, lambda: self.engine.usage() if self.engine else None)
        self._ignored: set[tuple[str, str]] = set()
        self._force_drain = asyncio.Event()

    def attach(self, engine: AsyncEngine) -> None:
        """Serve with ``engine`` (started by the caller). Chains its ``on_finish`` to metrics and logs."""
        previous = engine.on_finish

        def on_finish(out: RequestOutput) -> None:
            # Runs in the engine thread: an exception here would kill the engine loop, so none escapes.
            try:
                self.metrics.on_finish(out)
                log_finished(out)
                if previous is not None:
                    previous(out)
            except Exception:  # noqa: BLE001
                logger.exception("on_finish hook failed for %s", out.request_id)

        engine.on_finish = on_finish
        self.texts = TokenTexts(engine.tokenizer)
        self.engine = engine

    @property
    def status(self) -> str:
        if self.engine is None:
            return "loading"
        if self.engine.dead is not None:
            return "dead"
        return "draining" if self.draining else "ok"

    def admit(self) -> AsyncEngine:
        """The engine, if new work may start now; else a 503 naming why."""
        status = self.status
        if status == "dead":
            raise EngineDeadError(f"the engine loop has died: {self.engine.dead!r}")
        if status != "ok":
            what = "the model is still loading" if status == "loading" else "the server is shutting down"
            raise ApiError(503, f"{what}; retry later", None, status, {"Retry-After": "1"})
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def log_ignored(self, extra: dict | None, endpoint: str) -> None:
        for name in extra or {}:
            if (endpoint, name) not in self._ignored:
                self._ignored.add((endpoint, name))
                logger.warning("%s: ignoring unsupported request field %r (logged once)", endpoint, name)

    def new_stream(self, jobs: list[tuple[str | list[int], SamplingParams]], request_id: str) -> MergedStream:
        return MergedStream(self.admit(), jobs, request_id, self.metrics.observe_itl, self.streams)

    async def drain(self, timeout: float) -> None:
        """Stop admitting, give live requests ``timeout`` s to finish, then abort the rest (their streams
        end with finish_reason "abort") and wait briefly for those last chunks to go out."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline and not self._force_drain.is_set():
            await asyncio.sleep(0.05)
        if self.streams:
            logger.warning("aborting %d requests still running at shutdown", len(self.streams))
            for s in list(self.streams):
                s.abort()
            deadline = time.monotonic() + 5.0
            while self.streams and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    def force_drain(self) -> None:
        self._force_drain.set()


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, or a 400 / 413 saying what is wrong with it.

    An oversized body is read to its end and discarded before the 413 goes out: answering while the
    client is still sending makes most clients see a reset connection instead of the error body.
    """
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    body = bytearray()
    async for chunk in request.stream():
        if not too_big and len(body) + len(chunk) > limit:
            too_big = True
        if not too_big:
            body += chunk
    if too_big:
        raise ApiError(413, f"request body is larger than the server's limit of {limit} bytes "
                            f"(--max-request-bytes)", None, "request_too_large")
    if not body.strip():
        raise ApiError(400, "request body is empty: send a JSON object", None, "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})", None, "invalid_json") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from e
    if not isinstance(obj, dict):
        raise ApiError(400, f"request body must be a JSON object, not a JSON {type(obj).__name__}", None,
                       "invalid_json")
    return obj


def build_app(engine: AsyncEngine | None, served_model_name: str, api_key: str | None = None, *,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, model_root: str | None = None) -> FastAPI:
    from deltaserve.server.chat import create_chat_completion
    from deltaserve.server.completions import create_completion

    state = ServerState(served_model_name, api_key, max_request_bytes, model_root)
    if engine is not None:
        state.attach(engine)
    app = FastAPI(title="deltaserve", version=deltaserve.__version__, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)

    async def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    # Errors are mapped here rather than left to Starlette, whose catch-all re-raises after answering 500
    # (uvicorn would log every such error twice).
    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            return await create_chat_completion(request, state)
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        try:
            return await create_completion(request, state)
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    @v1.get("/models")
    async def models() -> JSONResponse:
        if state.engine is None:
            state.admit()  # 503 while loading: max_model_len is not known yet
        card = ModelCard(id=state.model_name, created=state.created, root=state.model_root,
                         max_model_len=state.engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = state.status
        if status == "ok":
            return JSONResponse({"status": "ok"})
        body = error_body(503, f"not ready: {status}", None, status)
        return JSONResponse({"status": status, **body}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": deltaserve.__version__})

    return app


def default_model_name(model: str | None) -> str:
    """Served name when none is given: the model path as given (as vLLM), or ``deltaserve-demo``."""
    return model if model else "deltaserve-demo"

