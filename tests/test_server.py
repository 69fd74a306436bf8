"""The OpenAI-compatible server, end to end: a real ``deltaserve serve`` subprocess on the tiny model,
driven by the official ``openai`` SDK and by raw HTTP (httpx)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest

try:
    import openai
except ImportError:  # the GPU image has none; tests/test_server_gpu.py uses Server, never its openai client
    openai = None

import deltaserve
from deltaserve.models.make_model import make_model

KEY = "test-key"
NAME = "tiny-test"
CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]


# -- a server subprocess (shared with test_server_abuse.py) --------------------------------------------
def _serve_command() -> list[str]:
    try:
        from deltaserve.cli import build_parser

        build_parser()
        return [sys.executable, "-m", "deltaserve.cli", "serve"]
    except ImportError as e:  # another subcommand is missing: test the serve command on its own
        warnings.warn(f"deltaserve.cli is not importable ({e}); using python -m deltaserve.server.cli", stacklevel=1)
        return [sys.executable, "-m", "deltaserve.server.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc: psutil is not always installed)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Server:
    def __init__(self, model_dir: Path, log: Path, *args: str, api_key: str | None = KEY,
                 command: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = [*(command or _serve_command()), str(model_dir), "--port", str(self.port), "--served-model-name", NAME,
               *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.while_loading: tuple[httpx.Response, httpx.Response] | None = None  # (/health, /v1/completions)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                health = httpx.get(self.url + "/health", timeout=1)
                if health.status_code == 200:
                    return
                if self.while_loading is None:
                    gen = httpx.post(self.url + "/v1/completions", json={"prompt": "Hi"}, headers=self.headers)
                    self.while_loading = (health, gen)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Un-labelled view of /metrics: ``name{labels}`` -> value, plus ``name`` for single series."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
                out.setdefault(key.split("{")[0], float(value))
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), dtype="float32")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # Async scheduling, as on a GPU (its CPU default is off; the engine tests run both ways).
    srv = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--max-num-seqs", "8",
                 "--max-model-len", "64", "--async-scheduling")
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# -- tests ---------------------------------------------------------------------------------------------
def test_health_version_models(server, client):
    # The server listens first and loads the model in the background: 503 until ready.
    assert server.while_loading is not None, "never saw the loading state"
    health, gen = server.while_loading
    assert (health.status_code, health.json()["status"]) == (503, "loading")
    assert (gen.status_code, gen.json()["error"]["code"]) == (503, "loading")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json() == {"version": deltaserve.__version__}
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    raw = httpx.get(server.url + "/v1/models", headers=server.headers).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model"
    assert raw["data"][0]["max_model_len"] == 64


def test_api_key_guards_v1_only(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_chat_streamed_equals_non_streamed(client):
    kw = dict(model=NAME, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion" and full.model == NAME
    assert abs(full.created - time.time()) < 60
    (choice,) = full.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.logprobs is None
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    *body, usage = chunks
    assert usage.choices == [] and usage.usage == full.usage
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in body) == choice.message.content


def test_completions_streamed_equals_non_streamed(client):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    *body, usage = chunks
    assert all(c.object == "text_completion" for c in chunks)
    assert usage.choices == [] and usage.usage == full.usage
    assert body[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text


def test_raw_sse_framing_and_done(server):
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Hi"})):
        body = {**body, "model": NAME, "max_tokens": 3, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + path, json=body, headers=server.headers) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "usage" not in chunks[0]  # no include_usage: no usage key at all
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def _greedy_text(client, n_tokens: int = 40) -> str:
    return client.completions.create(model=NAME, prompt="The cat", max_tokens=n_tokens, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_stop_string_from_greedy_output(client):
    text = _greedy_text(client)
    # A stop string from the middle of the greedy output, made of plain characters.
    stop = next(text[i:i + 3] for i in range(8, len(text) - 3)
                if text[i:i + 3].isascii() and text[i:i + 3].strip() and text[i:i + 3].isprintable())
    expected = text[:text.index(stop)]
    kw = dict(model=NAME, prompt="The cat", max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    out = client.completions.create(**kw).choices[0]
    assert (out.finish_reason, out.text) == ("stop", expected)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    included = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True,
                                                                 "include_stop_str_in_output": True}})
    assert included.choices[0].text == expected + stop


def test_n2_merges_choices(client):
    full = client.chat.completions.create(model=NAME, messages=CHAT, n=2, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in full.choices] == [0, 1]
    assert full.choices[0].message.content == full.choices[1].message.content  # greedy: the same
    assert full.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, n=2, max_tokens=6, temperature=1.0,
                                                 seed=3, stream=True, extra_body={"ignore_eos": True}))
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length"}
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in (0, 1)]
    assert texts[0] != texts[1]  # seed + index: sampled choices differ
    multi = client.completions.create(model=NAME, prompt=["a b", "c d e"], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text and multi.usage.completion_tokens == 12


def test_logprobs_shapes(client):
    out = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body={"ignore_eos": True}).choices[0]
    content = out.logprobs.content
    assert len(content) == 5
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and all(isinstance(b, int) for b in t.bytes)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
    streamed = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                              stream=True, extra_body={"ignore_eos": True})
    entries = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in entries] == [t.token for t in content]

    comp = client.completions.create(model=NAME, prompt="Hello", max_tokens=6, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True}).choices[0]
    lp = comp.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    # The 2 most likely plus the sampled token, keyed by text (two byte tokens may both read U+FFFD).
    assert all(top[tok] == x and len(top) <= 3 for tok, x, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert max(len(top) for top in lp.top_logprobs) >= 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_chat_template_kwargs_reach_the_template(client):
    kw = dict(model=NAME, messages=CHAT, max_tokens=2, temperature=0)
    plain = client.chat.completions.create(**kw)
    no_think = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # The template adds an empty <think></think> block when thinking is off.
    assert no_think.usage.prompt_tokens > plain.usage.prompt_tokens
    parts = client.chat.completions.create(
        model=NAME, max_tokens=2, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Tell me a story about a cat."}]}])
    assert parts.choices[0].finish_reason in ("length", "stop")


def test_extras_seed_and_unknown_fields(client):
    kw = dict(model=NAME, prompt="Hello there", max_tokens=8, temperature=1.0, seed=1234)
    extra = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2, "stop_token_ids": [3],
             "skip_special_tokens": False, "some_unknown_field": {"x": 1}}
    a = client.completions.create(**kw, extra_body=extra).choices[0].text
    b = client.completions.create(**kw, extra_body=extra).choices[0].text
    assert a == b  # same seed, same tokens


def test_max_tokens_defaults_and_caps_to_the_context(client):
    capped = client.completions.create(model=NAME, prompt="Hi", max_tokens=10**6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert capped.choices[0].finish_reason == "length" and capped.usage.total_tokens == 64
    default = client.completions.create(model=NAME, prompt="Hi", temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.total_tokens == 64  # omitted max_tokens: up to the context


def test_metrics_names_and_counters(server, client):
    before = server.metrics()
    out = client.completions.create(model=NAME, prompt="Count me", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "state_slots_usage_perc",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "request_success_total", "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count"):
        assert "deltaserve:" + name in after, name
    assert after["deltaserve:prompt_tokens_total"] - before["deltaserve:prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["deltaserve:generation_tokens_total"] - before["deltaserve:generation_tokens_total"] == 7
    key = f'deltaserve:request_success_total{{finished_reason="length",model_name="{NAME}"}}'
    assert after[key] - before.get(key, 0) == 1
    assert after["deltaserve:e2e_request_latency_seconds_count"] - before["deltaserve:e2e_request_latency_seconds_count"] == 1
    assert after["deltaserve:inter_token_latency_seconds_count"] > before["deltaserve:inter_token_latency_seconds_count"]
    assert after["deltaserve:num_requests_running"] == 0 and after["deltaserve:kv_cache_usage_perc"] == 0
