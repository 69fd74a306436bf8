"""``deltaserve serve`` on a GPU, end to end, as a user starts it: the default device (``auto``), async
scheduling and CUDA graphs on.

The CPU suite runs the same server on the CPU, where the engine loop never touches a GPU. A bug on that
path once killed every GPU server's engine at start while all the engine's GPU tests passed
(docs/perf/2026-12-06c.md): this test is the server's own check on the device.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_server import NAME, Server

from deltaserve import LLM, SamplingParams
from deltaserve.models.make_model import make_model

pytestmark = pytest.mark.gpu

PROMPTS = ["Tell me a story about a cat.", "Hi", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19"]
MAX_TOKENS = 12


def test_server_on_the_gpu_answers_like_the_offline_engine(tmp_path):
    model_dir = make_model("tiny", tmp_path / "tiny", dtype="bfloat16", seed=5)
    srv = Server(model_dir, tmp_path / "server.log", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.3")
    got, streamed = [], []
    try:
        srv.wait_ready(timeout=300)
        assert httpx.get(srv.url + "/health", timeout=5).json()["status"] == "ok"
        body = {"model": NAME, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        for prompt in PROMPTS:
            r = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": prompt}, headers=srv.headers,
                           timeout=60)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
            got.append(choice["text"])
            with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "prompt": prompt, "stream": True},
                              headers=srv.headers, timeout=60) as s:
                events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            streamed.append("".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]))
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    assert streamed == got
    # The offline engine (same defaults, after the server has given the GPU back), one prompt at a time.
    llm = LLM(str(model_dir), max_num_seqs=4, gpu_memory_utilization=0.3)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        want = [llm.generate([p], params)[0].text for p in PROMPTS]
    finally:
        llm.shutdown()
    assert got == want
