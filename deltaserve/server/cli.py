"""``deltaserve serve``: listen first, load the model in the background, drain on SIGTERM.

Start-up: the HTTP server binds at once and answers ``/health`` with 503 ("loading") while a thread
builds the engine; /health turns 200 when the model is ready. If loading fails, the process exits 1.

Shutdown (SIGTERM or SIGINT): new requests get 503 and /health says "draining", while the listening
socket stays open (so clients get an answer rather than "connection refused"); running requests get
``--shutdown-timeout`` seconds to finish, the rest are aborted (their streams end with
``finish_reason: "abort"``); then the HTTP server and the engine loop stop and the process exits 0.
A second signal skips the wait.

Engine death: if the engine loop dies (a GPU fault, a bug), the requests in flight get an
``engine_dead`` error and /health says "dead"; a second later the server stops and the process exits 1,
so that a supervisor restarts it rather than routing traffic to a server that can only answer 503
(vLLM does the same).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from types import FrameType

import uvicorn

from deltaserve.config import EngineConfig
from deltaserve.errors import ConfigError
from deltaserve.server.app import DEFAULT_MAX_REQUEST_BYTES, ServerState, build_app, default_model_name

logger = logging.getLogger(__name__)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineConfig.add_cli_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default loopback only; "
                                                            "0.0.0.0 exposes the server to the network).")
    parser.add_argument("--port", type=int, default=8000, help="Port to bind (0: any free port).")
    parser.add_argument("--served-model-name", default=None,
                        help="Model name in the API (default: MODEL as given, or deltaserve-demo).")
    parser.add_argument("--chat-template", default=None,
                        help="Jinja chat template to use instead of the checkpoint's: a file, or the template text "
                             "itself (checked at start).")
    parser.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer KEY' on /v1/* (default: $DELTASERVE_API_KEY, "
                             "else no key).")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="Requests that may wait beyond --max-num-seqs; more get 429 (default: no limit).")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="Seconds running requests get to finish after SIGTERM before they are aborted.")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="Largest request body accepted; larger ones get 413.")
    # SUPPRESS: the top-level `deltaserve --log-level` keeps its value unless given again after `serve`.
    parser.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"], help="Log level (default info).")


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: on SIGTERM it would close the socket at once, and
    re-raise the signal after shutdown (exit status -15 instead of 0)."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal(sig)


def main_serve(args: argparse.Namespace) -> int:
    try:
        cfg = EngineConfig.from_cli_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.chat_template is not None:
        from deltaserve.tokenizer import load_chat_template

        try:
            args.chat_template = load_chat_template(args.chat_template)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for flag, value, lowest in (("--max-queued-requests", args.max_queued_requests, 0),
                                ("--max-request-bytes", args.max_request_bytes, 1),
                                ("--shutdown-timeout", args.shutdown_timeout, 0)):
        if value is not None and value < lowest:
            print(f"error: {flag}={value} is invalid: use a value >= {lowest}", file=sys.stderr)
            return 2
    defaults = _defaults()
    serving = {k: getattr(args, k) for k in ("max_queued_requests", "shutdown_timeout", "max_request_bytes")
               if getattr(args, k) != defaults[k]}
    if args.chat_template is not None:
        serving["chat_template"] = f"{len(args.chat_template)} characters"
    options = {**cfg.non_defaults(), **serving}
    print("deltaserve serve: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "all defaults"), flush=True)
    return asyncio.run(_serve(args, cfg))


def _defaults() -> dict:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return vars(p.parse_args([]))


async def _serve(args: argparse.Namespace, cfg: EngineConfig) -> int:
    api_key = args.api_key or os.environ.get("DELTASERVE_API_KEY") or None
    name = args.served_model_name or default_model_name(cfg.model)
    app = build_app(None, name, api_key, max_request_bytes=args.max_request_bytes, model_root=cfg.model)
    state = app.state.server
    loop = asyncio.get_running_loop()
    log_level = getattr(args, "log_level", "info")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=5, log_config=None)
    draining: list[asyncio.Task] = []

    def on_signal(sig: int) -> None:
        # Called from the signal handler (main thread, between bytecodes): only schedule work.
        loop.call_soon_threadsafe(begin_drain, sig)

    def begin_drain(sig: int) -> None:
        if draining:  # a second signal: stop waiting for running requests
            state.force_drain()
            return
        logger.info("%s: draining (up to %.0f s for running requests)", signal.Signals(sig).name,
                    args.shutdown_timeout)
        draining.append(asyncio.ensure_future(drain()))

    async def drain() -> None:
        if state.engine is not None:
            await state.drain(args.shutdown_timeout)
        server.should_exit = True

    server = _Server(config, on_signal)
    loader = asyncio.ensure_future(_load(server, state, cfg, args))
    try:
        await server.serve()
    finally:
        loader.cancel()
        if state.engine is not None:
            await asyncio.to_thread(_stop_engine, state.engine)
    if not server.started:
        return 1  # could not bind (uvicorn logged why)
    died = state.engine is not None and state.engine.dead is not None
    return 1 if state.load_error is not None or died else 0


def _stop_engine(engine) -> None:
    engine.shutdown(5.0)
    # AsyncEngine.shutdown stops its loop thread only; the LLMEngine's shutdown stops tensor-parallel
    # worker processes (idempotent). Only once the loop thread is gone: it must not race a step.
    thread = getattr(engine, "_thread", None)
    inner = getattr(engine, "engine", None)
    if (thread is None or not thread.is_alive()) and hasattr(inner, "shutdown"):
        inner.shutdown()


async def _load(server: _Server, state: ServerState, cfg: EngineConfig, args: argparse.Namespace) -> None:
    """Build the engine in a daemon thread once the socket is bound; attach it; or stop the server."""
    from deltaserve.engine.async_engine import AsyncEngine

    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.01)
    sock = server.servers[0].sockets[0].getsockname() if server.servers else (args.host, args.port)
    print(f"deltaserve: listening on http://{sock[0]}:{sock[1]} (model {state.model_name}: loading; "
          f"/health answers 503 until it is ready)", flush=True)
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def build() -> None:
        try:
            engine = AsyncEngine(cfg, max_queued_requests=args.max_queued_requests)
            if args.chat_template is not None:
                engine.tokenizer.set_chat_template(args.chat_template)
            result = (engine, None)
        except BaseException as e:  # noqa: BLE001 - reported to the event loop below
            result = (None, e)
        try:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))
        except RuntimeError:  # the loop has closed: the server stopped while we were loading
            pass

    # A daemon thread, not the default executor: a signal during a long load must not wait for it.
    threading.Thread(target=build, name="deltaserve-load", daemon=True).start()
    engine, error = await done
    if error is not None:
        logger.error("could not load the model: %s", error, exc_info=error)
        state.load_error = error
        server.should_exit = True
        return
    engine.start()
    state.attach(engine)
    print(f"deltaserve: ready: {state.model_name} (max_model_len {engine.max_model_len}) at "
          f"http://{sock[0]}:{sock[1]}/v1", flush=True)
    await exit_when_dead(server, engine)


async def exit_when_dead(server, engine, poll_s: float = 0.2, grace_s: float = 1.0) -> None:
    """Stop the server once the engine loop has died, after ``grace_s`` for the open streams to carry
    their error to the clients. Returns at once if the server stops for another reason."""
    while engine.dead is None:
        if server.should_exit:
            return
        await asyncio.sleep(poll_s)
    logger.error("the engine loop has died (%r): stopping the server", engine.dead)
    await asyncio.sleep(grace_s)
    server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    """``python -m deltaserve.server.cli``: the serve command alone."""
    parser = argparse.ArgumentParser(prog="deltaserve-serve", description=__doc__)
    add_serve_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, getattr(args, "log_level", "info").upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return main_serve(args)


if __name__ == "__main__":
    sys.exit(main())
