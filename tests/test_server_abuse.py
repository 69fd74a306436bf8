"""The server under abuse: bad input, clients that vanish, overload, and SIGTERM with work in flight.

Every bad request must get the right 4xx/5xx with an OpenAI error body, and the server must keep serving.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_server import CHAT, KEY, NAME, Server, alive, children_of

import deltaserve
from deltaserve.engine.request import RequestOutput
from deltaserve.errors import EngineDeadError
from deltaserve.server.app import build_app

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from deltaserve.models.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("tiny"), dtype="float32")


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Every server of this module, launched at once: the slow ones load while the first is in use."""
    logs = tmp_path_factory.mktemp("logs")
    all_ = {
        "main": Server(model_dir, logs / "main.log", "--max-num-seqs", "8", "--max-model-len", "256"),
        "overload": Server(model_dir, logs / "overload.log", "--max-num-seqs", "2", "--max-queued-requests", "2",
                           "--debug-step-delay-ms", "50", "--max-model-len", "256"),
        "drain": Server(model_dir, logs / "drain.log", "--max-num-seqs", "8", "--shutdown-timeout", "2",
                        "--debug-step-delay-ms", "30", "--max-model-len", "2048"),
        # Two tensor-parallel ranks: a worker process (and multiprocessing's resource tracker) that must not
        # outlive the server. Too slow on 2 CPU cores for the timed drain test, so it gets its own check.
        "tp": Server(model_dir, logs / "tp.log", "--tensor-parallel-size", "2", "--max-model-len", "256"),
    }
    try:
        yield all_
    finally:
        codes = {name: srv.stop() for name, srv in all_.items()}
        assert codes["main"] == 0 and codes["overload"] == 0, (codes, all_["main"].log(), all_["overload"].log())


@pytest.fixture(scope="module")
def server(servers):
    servers["main"].wait_ready()
    return servers["main"]


def assert_error_body(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


def _chat(**fields) -> dict:
    return {"model": NAME, "messages": CHAT, "max_tokens": 4, **fields}


LONG_PROMPT = "the cat sat on the mat " * 120  # well over the 256-token context

# (id, path, body: dict -> JSON, bytes -> raw, status, param)
BAD = [
    ("malformed-json", "chat", b'{"messages": [', 400, None),
    ("json-list", "chat", b"[1, 2, 3]", 400, None),
    ("empty-body", "chat", b"", 400, None),
    ("non-utf8", "chat", b'{"messages": "\xff\xfe\xfd"}', 400, None),
    ("messages-string", "chat", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("missing-messages", "chat", {"model": NAME}, 400, "messages"),
    ("empty-messages", "chat", {"model": NAME, "messages": []}, 400, "messages"),
    ("message-no-role", "chat", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("message-no-content", "chat", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("bad-role", "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("temperature-string", "chat", _chat(temperature="hot"), 400, "temperature"),
    ("temperature-negative", "chat", _chat(temperature=-1), 400, "temperature"),
    ("temperature-nan", "chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature"),
    ("max-tokens-float", "chat", _chat(max_tokens=1.5), 400, "max_tokens"),
    ("max-tokens-bool", "chat", _chat(max_tokens=True), 400, "max_tokens"),
    ("max-tokens-zero", "chat", _chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", "chat", _chat(max_tokens=-5), 400, "max_tokens"),
    ("max-completion-tokens-zero", "chat", _chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("n-string", "chat", _chat(n="2"), 400, "n"),
    ("n-zero", "chat", _chat(n=0), 400, "n"),
    ("n-huge", "chat", _chat(n=100000), 400, "n"),
    ("stop-int", "chat", _chat(stop=5), 400, "stop"),
    ("stop-empty-string", "chat", _chat(stop=[""]), 400, "stop"),
    ("top-p-zero", "chat", _chat(top_p=0), 400, "top_p"),
    ("top-p-big", "chat", _chat(top_p=1.5), 400, "top_p"),
    ("top-k-negative", "chat", _chat(top_k=-2), 400, "top_k"),
    ("min-p-big", "chat", _chat(min_p=2), 400, "min_p"),
    ("repetition-penalty-zero", "chat", _chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("min-tokens-over-max", "chat", _chat(min_tokens=10, max_tokens=2), 400, "min_tokens"),
    ("stop-token-ids-negative", "chat", _chat(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("seed-string", "chat", _chat(seed="abc"), 400, "seed"),
    ("top-logprobs-50", "chat", _chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", "chat", _chat(top_logprobs=2), 400, "top_logprobs"),
    ("stream-options-string", "chat", _chat(stream=True, stream_options="yes"), 400, "stream_options"),
    ("template-kwargs-list", "chat", _chat(chat_template_kwargs=[1]), 400, "chat_template_kwargs"),
    ("chat-prompt-too-long", "chat", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("unknown-part-type", "chat", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400,
     "messages"),
    ("image-part", "chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}, 501, "messages"),
    ("presence-penalty", "chat", _chat(presence_penalty=0.5), 501, "presence_penalty"),
    ("json-mode", "chat", _chat(response_format={"type": "json_object"}), 501, "response_format"),
    ("json-schema-completions", "completions", {"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, 501, "response_format"),
    ("response-format-string", "chat", _chat(response_format="json"), 400, "response_format"),
    ("tools", "chat", _chat(tools=[TOOL]), 501, "tools"),
    ("tools-required", "chat", _chat(tools=[TOOL], tool_choice="required"), 501, "tools"),
    ("legacy-functions", "chat", _chat(functions=[TOOL["function"]]), 501, "functions"),
    ("unknown-model", "chat", _chat(model="gpt-9"), 404, "model"),
    ("completions-no-prompt", "completions", {"model": NAME, "max_tokens": 2}, 400, "prompt"),
    ("completions-empty-prompt", "completions", {"prompt": "", "max_tokens": 2}, 400, "prompt"),
    ("completions-empty-list", "completions", {"prompt": [], "max_tokens": 2}, 400, "prompt"),
    ("completions-mixed-list", "completions", {"prompt": ["a", 1], "max_tokens": 2}, 400, "prompt"),
    ("token-id-out-of-vocab", "completions", {"prompt": [1, 2, 10**9], "max_tokens": 2}, 400, "prompt"),
    ("completions-prompt-too-long", "completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("completions-logprobs-bool", "completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("completions-logprobs-50", "completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("echo", "completions", {"prompt": "hi", "echo": True}, 501, "echo"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_request(server, case):
    name, path, body, status, param = case
    url = f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
    else:
        r = httpx.post(url, json=body, headers=AUTH)
    err = assert_error_body(r, status, param)
    if name.endswith("prompt-too-long"):
        assert "maximum context length" in err["message"]
        counts = [int(x) for x in re.findall(r"\d+", err["message"])]
        assert 256 in counts and any(c > 256 for c in counts), err["message"]
    if name == "unknown-model":
        assert err["message"] == "The model `gpt-9` does not exist."


def test_text_format_and_declined_tools_are_served(server):
    """``response_format: text`` and tools with ``tool_choice: "none"`` ask for nothing deltaserve lacks: 200."""
    url = server.url + "/v1/chat/completions"
    for extra in ({"response_format": {"type": "text"}}, {"tools": [TOOL], "tool_choice": "none"},
                  {"functions": [TOOL["function"]], "function_call": "none"}, {"response_format": None, "tools": []}):
        r = httpx.post(url, json=_chat(**extra), headers=AUTH, timeout=60)
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["message"]["content"]


def test_http_level_errors(server):
    chat = server.url + "/v1/chat/completions"
    assert_error_body(httpx.post(chat, json=_chat(), headers={"Authorization": "Bearer wrong"}), 401)
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (10 * 2**20) + b'"}]}'
    err = assert_error_body(httpx.post(chat, content=big, headers=AUTH, timeout=60), 413)
    assert err["code"] == "request_too_large"
    assert_error_body(httpx.get(chat, headers=AUTH), 405)
    assert_error_body(httpx.get(server.url + "/v1/nothing-here", headers=AUTH), 404)


def test_a_dead_engine_loop_stops_the_server_with_status_1(model_dir, tmp_path):
    """A real server whose engine loop dies on its first step (a fault injected into the subprocess): the
    request in flight gets ``engine_dead``, /health says "dead", and the process exits 1 instead of
    answering 503 for ever (a benchmark waited ten minutes on such a server)."""
    launcher = tmp_path / "serve_with_a_faulty_engine.py"
    root = Path(deltaserve.__file__).resolve().parents[1]  # importable whether or not it is pip-installed
    launcher.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from deltaserve.engine.engine import LLMEngine\n\n"
        "def step(self):\n"
        "    raise RuntimeError('injected engine fault')\n\n"
        "LLMEngine.step = step\n"
        "from deltaserve.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    srv = Server(model_dir, tmp_path / "dead.log", "--max-model-len", "256",
                 command=[sys.executable, str(launcher), "serve"])
    try:
        srv.wait_ready()
        err = assert_error_body(httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                                           headers=srv.headers, timeout=30), 503)
        assert err["code"] == "engine_dead" and "injected engine fault" in err["message"]
        try:  # the server stops about a second after the engine died: a slow machine may ask too late
            health = httpx.get(srv.url + "/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "dead"
        except httpx.ConnectError:
            assert srv.proc.poll() is not None
        assert srv.proc.wait(timeout=30) == 1, srv.log()
        assert "stopping the server" in srv.log()
    finally:
        srv.stop()


def test_internal_and_in_band_errors():
    """In-process, with a scripted engine (the real one cannot be made to fail on demand): an unexpected
    exception is a 500 OpenAI body and the app keeps serving; an error after a stream started goes
    in-band as ``data: {"error": ...}`` followed by ``data: [DONE]``."""

    class ScriptedEngine:
        on_finish, tokenizer, dead, max_model_len = None, None, None, 64

        def usage(self) -> dict:
            return {}

        def abort(self, request_id: str) -> None:
            pass

        async def generate(self, prompt, params, request_id):
            if prompt == [1]:
                raise RuntimeError("kaboom")
            await asyncio.sleep(0)  # as the real engine: outputs come from its loop, never synchronously
            yield RequestOutput(request_id, None, prompt, "Hi", [5], None, None, delta_text="Hi", delta_token_ids=[5])
            raise EngineDeadError("the engine loop has died: test")

    app = build_app(ScriptedEngine(), NAME)

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            err = assert_error_body(await c.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}), 500)
            assert err["type"] == "server_error" and "kaboom" in err["message"]
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/v1/completions", json={"prompt": [2], "max_tokens": 2, "stream": True})
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[0])["choices"][0]["text"] == "Hi"
            assert json.loads(events[1])["error"]["code"] == "engine_dead" and events[2:] == ["[DONE]"]
            err = assert_error_body(await c.post("/v1/completions", json={"prompt": [2], "max_tokens": 2}), 503)
            assert err["code"] == "engine_dead"

    asyncio.run(go())


def _running(server) -> tuple[float, float, float, float]:
    m = server.metrics()
    return tuple(m["deltaserve:" + k] for k in ("num_requests_running", "num_requests_waiting",
                                                 "kv_cache_usage_perc", "state_slots_usage_perc"))


def _wait_idle(server, timeout: float) -> float:
    t0 = time.monotonic()
    while _running(server) != (0, 0, 0, 0):
        assert time.monotonic() - t0 < timeout, f"still busy after {timeout} s: {_running(server)}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_non_streamed_disconnect_aborts(server):
    aborts = f'deltaserve:request_success_total{{finished_reason="abort",model_name="{NAME}"}}'
    before = server.metrics()[aborts]
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 250, "temperature": 0, "ignore_eos": True}

    async def go() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            post = asyncio.create_task(c.post(server.url + "/v1/completions", json=body, headers=AUTH))
            while _running(server)[0] < 1:  # running in the engine, not still on its way
                assert not post.done(), post.result().text
                await asyncio.sleep(0.02)
            post.cancel()  # the client gives up: httpx closes the connection
            await asyncio.gather(post, return_exceptions=True)

    asyncio.run(go())
    _wait_idle(server, 5.0)
    assert server.metrics()[aborts] == before + 1


def test_cancellation_storm(server):
    aborts = f'deltaserve:request_success_total{{finished_reason="abort",model_name="{NAME}"}}'
    before = server.metrics()[aborts]
    rng = random.Random(0)

    async def one(c: httpx.AsyncClient, i: int) -> None:
        body = {"model": NAME, "max_tokens": 200, "stream": True, "ignore_eos": True,
                **({"messages": CHAT} if i % 2 else {"prompt": "Once upon a time"})}
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        keep = rng.randint(1, 3)
        async with c.stream("POST", server.url + path, json=body, headers=AUTH) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if n >= keep:
                    break  # leaving the block closes the connection mid-stream

    async def storm() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as c:
            await asyncio.gather(*(one(c, i) for i in range(100)))

    asyncio.run(storm())
    _wait_idle(server, 5.0)
    assert server.metrics()[aborts] - before >= 90  # 200 tokens each: nearly all were cut off, not finished
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 8}, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    assert time.monotonic() - t0 < 10


def test_still_serving_after_abuse(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat(max_tokens=5, ignore_eos=True), headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


# -- overload and shutdown: servers of their own (started with the first one, see `servers`) -----------
@pytest.fixture(scope="module")
def slow_servers(servers):
    for name in ("overload", "drain", "tp"):
        servers[name].wait_ready()
    return servers["overload"], servers["drain"], servers["tp"]


def test_overload_gets_429_at_once(slow_servers):
    srv, _, _ = slow_servers
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 30, "ignore_eos": True}

    async def one(c: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
        t0 = time.monotonic()
        r = await c.post(srv.url + "/v1/completions", json=body, headers=AUTH)
        return r.status_code, time.monotonic() - t0, r

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c) for _ in range(12)))

    results = asyncio.run(burst())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(ok) == 4 and len(refused) == 8, [r[0] for r in results]  # 2 running + 2 queued
    for _, seconds, r in refused:
        assert seconds < 1.0
        assert assert_error_body(r, 429)["type"] == "rate_limit_error" and r.headers["retry-after"]
    for _, seconds, r in ok:
        assert r.json()["usage"]["completion_tokens"] == 30 and seconds > 30 * 0.05
    # n=5 cannot fit (limit 4): refused as a whole, with none of its 5 sub-requests left behind.
    r = httpx.post(srv.url + "/v1/completions", json={**body, "n": 5}, headers=AUTH)
    assert_error_body(r, 429)
    assert _running(srv)[:2] == (0, 0)


def test_sigterm_drains_then_aborts(slow_servers):
    _, srv, _ = slow_servers
    pid = srv.proc.pid

    async def stream(c: httpx.AsyncClient, path: str, body: dict, started: asyncio.Event) -> list[str]:
        chunks = []
        async with c.stream("POST", srv.url + path, json={**body, "stream": True, "ignore_eos": True},
                            headers=AUTH) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    if len(chunks) >= 2:  # past the role chunk: the request is running in the engine
                        started.set()
        return chunks

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as c:
            events = [asyncio.Event() for _ in range(4)]
            longs = [asyncio.create_task(stream(c, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1500}, e))
                     for e in events[:3]]
            # Short enough to finish within the 2 s drain even on a busy 2-core machine.
            short = asyncio.create_task(stream(c, "/v1/completions", {"prompt": "Hi", "max_tokens": 6}, events[3]))
            for e in events:
                await asyncio.wait_for(e.wait(), 30)
            children = children_of(pid)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            late = await c.post(srv.url + "/v1/chat/completions", json=_chat(), headers=AUTH)
            health = await c.get(srv.url + "/health")
            return await asyncio.gather(*longs), await short, late, health, children, t0

    longs, short, late, health, children, t0 = asyncio.run(scenario())
    assert_error_body(late, 503)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] == "length", short
    for chunks in longs:
        assert chunks[-1] == "[DONE]"
        finish = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-1]]
        assert finish[-1] == "abort" and finish.count("abort") == 1
    assert srv.proc.wait(timeout=2 + 5 - (time.monotonic() - t0)) == 0, srv.log()
    assert time.monotonic() - t0 < 2 + 5
    assert not [p for p in children if alive(p)], "child processes outlived the server"


def test_sigterm_leaves_no_tensor_parallel_workers(slow_servers):
    _, _, srv = slow_servers
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, headers=AUTH, timeout=60)
    assert r.status_code == 200
    children = children_of(srv.proc.pid)
    assert children, "expected tensor-parallel worker processes"
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=20) == 0, srv.log()
    deadline = time.monotonic() + 5  # the resource tracker leaves when its pipe closes
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in children if alive(p)], "child processes outlived the server"
