"""An async streaming chat client that times one request the way ``vllm bench serve`` does.

- TTFT: from just before the POST to the first chunk that carries content (a role-only first delta
  is not a token).
- ITL: the gaps between consecutive content-bearing chunks (a chunk may carry more than one token).
- E2E: from just before the POST to the end of the stream.
- Completion tokens: from the final usage chunk (``stream_options.include_usage``), never from
  counting chunks. A stream without one is a failed request, as is any HTTP or in-band error:
  failures are recorded with their reason, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp


@dataclass
class RequestResult:
    prompt: str
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # time.perf_counter() just before the POST
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        """(e2e - ttft) / (n - 1): the mean time per output token after the first."""
        if not self.ok or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def decode_tok_s(self) -> float | None:
        """(n - 1) / (e2e - ttft): this request's own decode rate, prefill excluded."""
        tpot = self.tpot_s
        return 1.0 / tpot if tpot else None

    def to_dict(self, with_text: bool = False) -> dict:
        d = asdict(self)
        d["tpot_s"], d["decode_tok_s"] = self.tpot_s, self.decode_tok_s
        if not with_text:
            d.pop("text")
        return d


def chat_payload(model: str, prompt: str, max_tokens: int, temperature: float, ignore_eos: bool,
                 seed: int | None = None) -> dict:
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
               "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True  # a vLLM extra: every request then decodes exactly max_tokens
    if seed is not None:
        payload["seed"] = seed
    return payload


async def stream_chat(session: aiohttp.ClientSession, url: str, payload: dict,
                      start_event: asyncio.Event | None = None) -> RequestResult:
    """POST one streaming chat request to ``url`` (the server root) and time it."""
    result = RequestResult(prompt=payload["messages"][-1]["content"])
    if start_event is not None:
        await start_event.wait()
    parts: list[str] = []
    result.start = last = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=payload) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for raw in resp.content:  # aiohttp yields the SSE stream line by line
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"in-band error: {json.dumps(chunk['error'])[:300]}"
                    return result
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        if result.ttft_s is None:
                            result.ttft_s = now - result.start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        parts.append(content)
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
                    result.completion_tokens = chunk["usage"].get("completion_tokens") or 0
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # ValueError: bad JSON, huge line
        result.error = f"{type(e).__name__}: {e}"[:300]
        return result
    result.e2e_s = time.perf_counter() - result.start
    result.text = "".join(parts)
    if result.completion_tokens == 0:
        result.error = "the stream had no usage chunk with completion_tokens (stream_options.include_usage)"
    elif result.ttft_s is None:
        result.error = (f"the stream carried no content: {result.completion_tokens} completion tokens decoded to no "
                        "text (ids the tokenizer cannot decode or skips, e.g. a random model's padded vocabulary)")
    elif result.finish_reason == "abort":
        result.error = "the server aborted the request (finish_reason abort)"
    else:
        result.ok = True
    return result


@dataclass
class Round:
    """N requests started together: their results and the round's wall time."""

    results: list[RequestResult]
    wall_s: float

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results if r.ok)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.results if r.ok)

    @property
    def combined_tok_s(self) -> float:
        """All completion tokens of the round over its wall time (first POST to last stream end)."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0


async def run_round(session: aiohttp.ClientSession, url: str, payloads: list[dict]) -> Round:
    """Start all requests together: each task waits on one event, which is set once all are waiting."""
    start = asyncio.Event()
    tasks = [asyncio.ensure_future(stream_chat(session, url, p, start)) for p in payloads]
    await asyncio.sleep(0)  # let every task reach start.wait()
    t0 = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    return Round(list(results), time.perf_counter() - t0)


def make_session(timeout_s: float, api_key: str | None = None) -> aiohttp.ClientSession:
    # limit=0: no connection cap, or concurrency above aiohttp's default of 100 would queue client-side.
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s), headers=headers)


async def first_model(session: aiohttp.ClientSession, url: str) -> str:
    """The first id of GET /v1/models."""
    async with session.get(f"{url}/v1/models") as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url}/v1/models: HTTP {resp.status}: {(await resp.text())[:200]}")
        data = (await resp.json()).get("data") or []
    if not data:
        raise RuntimeError(f"GET {url}/v1/models lists no model")
    return data[0]["id"]


async def health_ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False
