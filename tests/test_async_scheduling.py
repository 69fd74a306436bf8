"""Async scheduling on the CPU: step t+1 is launched before step t lands, and nothing a caller sees changes.

The same code runs on the GPU, where it is the default; there the point is that the host's work overlaps
the device's. Here every launch completes before it returns, so these tests check the bookkeeping:
placeholders fed from the previous step's samples, rows dropped for requests that stopped or were
aborted meanwhile, no extra row after ``max_tokens``, and every slot and block given back.
"""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.config import EngineConfig
from deltaserve.engine.batch import resolve_placeholders
from deltaserve.engine.request import placeholder
from deltaserve.errors import ConfigError
from deltaserve.models.make_model import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny-async"), dtype="float32", seed=11)


@pytest.fixture(scope="module")
def engines(model_dir):
    sync = LLM(str(model_dir), max_num_seqs=8, async_scheduling=False)
    asyn = LLM(str(model_dir), max_num_seqs=8, async_scheduling=True)
    return sync, asyn


def assert_idle(llm: LLM) -> None:
    e = llm.engine
    u = e.usage()
    assert (u["running"], u["waiting"]) == (0, 0) and not e.has_unfinished()
    assert u["kv_free"] == u["kv_total"] and u["slots_free"] == u["slots_total"]
    assert e._inflight is None


def record_launches(llm: LLM) -> list[list[tuple[str, list[int]]]]:
    """Wrap the runner's launch: every step's (request id, input ids) per scheduled request."""
    runner, log = llm.engine.runner, []
    launch = runner.launch

    def spy(scheduled, prev=None):
        log.append([(s.request.request_id,
                     s.request.token_ids(s.request.num_computed, s.request.num_computed + s.num_tokens))
                    for s in scheduled])
        return launch(scheduled, prev)

    runner.launch = spy
    return log


def mixed_workload(vocab_text: str) -> tuple[list, list[SamplingParams]]:
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 1900) for _ in range(n)] for n in (1, 7, 33, 70, 3, 120)] + [vocab_text]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=17, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=50, seed=9, max_tokens=25, ignore_eos=True, min_tokens=4),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=0),
        SamplingParams(temperature=0.5, seed=77, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
    ]
    return prompts, params


def assert_same_outputs(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
        assert (x.logprobs is None) == (y.logprobs is None)
        for lx, ly in zip(x.logprobs or [], y.logprobs or [], strict=True):
            assert lx["token"] == ly["token"] and math.isclose(lx["logprob"], ly["logprob"], abs_tol=1e-5)
            assert [t for t, _ in lx["top"]] == [t for t, _ in ly["top"]]


def test_async_equals_sync_on_a_mixed_batch(engines):
    """Greedy and seeded rows, logprobs, min_tokens, one-token requests, a text prompt: identical."""
    sync, asyn = engines
    prompts, params = mixed_workload("Once upon a time, a cat")
    expected = sync.generate(prompts, params)
    log = record_launches(asyn)
    try:
        got = asyn.generate(prompts, params)
    finally:
        del asyn.engine.runner.launch
    assert_same_outputs(got, expected)
    assert_idle(asyn)
    # Decodes were launched before their input token had landed: they read it on the device.
    pending_inputs = [ids for step in log for _, ids in step if ids[-1] < 0]
    assert len(pending_inputs) > 50
    assert all(len(ids) == 1 for ids in pending_inputs)


def test_stops_drop_one_row_and_max_tokens_none(engines):
    """A request stopping on a token was already given one more row (dropped); one ending by max_tokens
    is not scheduled after its last token is in flight."""
    sync, asyn = engines
    prompt = [100, 200, 300]
    free = sync.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids
    stop_at = free[6]
    stop = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at])
    length = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    expected = sync.generate([prompt, prompt], [stop, length])
    log = record_launches(asyn)
    try:
        got = asyn.generate([prompt, prompt], [stop, length], )
    finally:
        del asyn.engine.runner.launch
    assert_same_outputs(got, expected)
    rows = {rid: sum(1 for step in log for r, _ in step if r == rid) for step in log for rid, _ in step}
    stopped_id, capped_id = got[0].request_id, got[1].request_id
    assert rows[stopped_id] == len(got[0].token_ids) + 1  # the prefill, the decodes, one dropped decode
    assert rows[capped_id] == len(got[1].token_ids) == 9  # the prefill and 8 decodes: nothing wasted
    assert_idle(asyn)


def test_stop_strings_and_eos_match_sync(engines):
    sync, asyn = engines
    prompt = "Write a 1000-word story about a cat."
    free = sync.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    params = [SamplingParams(temperature=0, max_tokens=30, stop=[free.text[8:11]], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, stop=[free.text[8:11]], ignore_eos=True,
                             include_stop_str_in_output=True)]
    assert_same_outputs(asyn.generate([prompt] * 2, params), sync.generate([prompt] * 2, params))
    eos = asyn.engine.model_config.eos_token_ids
    for llm in engines:
        llm.engine.model_config.__dict__["eos_token_ids"] = (free.token_ids[4],)
    try:
        p = SamplingParams(temperature=0, max_tokens=30)
        assert_same_outputs(asyn.generate([prompt], p), sync.generate([prompt], p))
    finally:
        for llm in engines:
            llm.engine.model_config.__dict__["eos_token_ids"] = eos
    assert_idle(asyn)


def test_repetition_penalty_lands_the_step_first(engines):
    """The penalty reads the whole history on the host: such a request's step lands before the next is
    scheduled, so its tokens equal the synchronous engine's."""
    sync, asyn = engines
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=3.0),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    log = record_launches(asyn)
    try:
        got = asyn.generate(prompts, params)
    finally:
        del asyn.engine.runner.launch
    assert_same_outputs(got, sync.generate(prompts, params))
    assert all(ids[-1] >= 0 for step in log for _, ids in step)  # never a placeholder in such a batch
    assert_idle(asyn)


def test_abort_while_in_flight_drops_the_row(engines):
    _, asyn = engines
    e = asyn.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    keep = e.make_request([1, 2, 3], params, request_id="keep")
    gone = e.make_request([4, 5, 6], params, request_id="gone")
    e.add_request(keep)
    e.add_request(gone)
    seen = {"keep": 0, "gone": 0}
    for _ in range(5):
        for out in e.step():
            seen[out.request_id] += len(out.delta_token_ids)
    assert e._inflight is not None and gone.pending  # its decode is on the device
    aborted = e.abort("gone")
    assert aborted.finish_reason == "abort" and all(t >= 0 for t in aborted.token_ids)
    assert aborted.token_ids == gone.output_token_ids and not gone.pending
    while e.has_unfinished():
        for out in e.step():
            assert out.request_id == "keep"
            seen["keep"] += len(out.delta_token_ids)
    assert seen["keep"] == 50 and len(keep.output_token_ids) == 50
    assert_idle(asyn)


def test_abort_storm_under_async_scheduling_frees_everything(engines):
    _, asyn = engines
    e, rng = asyn.engine, random.Random(1)
    live = []
    for i in range(40):
        r = e.make_request([rng.randrange(5, 1900) for _ in range(rng.choice([1, 5, 40]))],
                           SamplingParams(temperature=0.7, max_tokens=rng.randrange(1, 30),
                                          stop_token_ids=[rng.randrange(5, 1900)]), request_id=f"s{i}")
        e.add_request(r)
        live.append(r.request_id)
    while e.has_unfinished():
        if live and rng.random() < 0.3:
            e.abort(live.pop(rng.randrange(len(live))))
        for out in e.step():
            assert all(t >= 0 for t in out.token_ids)
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
    assert_idle(asyn)


def test_placeholders_read_the_previous_samples():
    prev = torch.tensor([40, 41, 42])
    ids = torch.tensor([7, placeholder(2), placeholder(0), 9])
    assert resolve_placeholders(ids, prev).tolist() == [7, 42, 40, 9]
    with pytest.raises(RuntimeError, match="pending token"):
        resolve_placeholders(ids, None)


@pytest.mark.parametrize("n", [1, 5, 300])
def test_placeholder_kernel_equals_the_reference_in_place(kernel_device, n):
    """The one-launch kernel the decode graphs use (ops/placeholders.py) against the PyTorch reference:
    several blocks, every row pending or none, prev longer than the batch, int32 samples."""
    pytest.importorskip("triton")
    from deltaserve.ops.placeholders import resolve_placeholders_

    g = torch.Generator().manual_seed(n)
    prev = torch.randint(0, 50_000, (n + 3,), generator=g, dtype=torch.int32).to(kernel_device)
    for kind in ("mixed", "all", "none"):
        ids = torch.randint(0, 50_000, (n,), generator=g)
        pending = {"mixed": torch.rand(n, generator=g) < 0.5, "all": torch.ones(n, dtype=torch.bool),
                   "none": torch.zeros(n, dtype=torch.bool)}[kind]
        rows = torch.randint(0, n + 3, (n,), generator=g)
        ids = torch.where(pending, -1 - rows, ids).to(kernel_device)
        want = resolve_placeholders(ids, prev.long())
        got = resolve_placeholders_(ids, prev)
        assert got.data_ptr() == ids.data_ptr() and torch.equal(got, want), kind
    with pytest.raises(ValueError, match="contiguous 1-D"):
        resolve_placeholders_(torch.zeros(4, 2, dtype=torch.int64, device=kernel_device), prev)


def test_engine_loop_thread_gets_a_gpu_index(monkeypatch):
    """``torch.cuda.set_device`` refuses a bare ``cuda`` device: the loop thread gets an index, the one
    current where the engine was built (on the GPU a bare ``cuda`` killed the server's loop at start)."""
    from deltaserve.engine.async_engine import loop_device_index

    assert loop_device_index(torch.device("cpu")) is None
    assert loop_device_index(torch.device("cuda", 2)) == 2
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert loop_device_index(torch.device("cuda")) == 3


def test_config_default_and_tensor_parallel_refusal():
    assert EngineConfig(model="x", device="cpu").async_scheduling is False  # nothing to overlap on the CPU
    assert EngineConfig(model="x", device="cpu", async_scheduling=True).async_scheduling is True
    with pytest.raises(ConfigError, match=r"async_scheduling=True .*--no-async-scheduling"):
        EngineConfig(model="x", device="cpu", async_scheduling=True, tensor_parallel_size=2)
    assert EngineConfig(model="x", device="cpu", tensor_parallel_size=2).async_scheduling is False
    # The server logs the options that differ from this machine's defaults: an explicit choice shows.
    assert "async_scheduling" not in EngineConfig(model="x", device="cpu").non_defaults()
    assert EngineConfig(model="x", device="cpu", async_scheduling=True).non_defaults()["async_scheduling"] is True


def _decode_in_flight(engines, prompt: list[int], max_tokens: int):
    """The async engine with one greedy request whose first decode is on the device; the synchronous
    engine's tokens for it."""
    sync, asyn = engines
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    expected = sync.generate([prompt], p)[0].token_ids
    e = asyn.engine
    r = e.make_request(prompt, p)
    e.add_request(r)
    e.step()  # the prefill
    e.step()  # the first decode, reading the prefill's token on the device; the prefill lands
    assert e._inflight is not None and r.pending
    return e, r, expected


def test_turning_async_off_mid_flight_lands_in_order(engines):
    """Switching to synchronous steps with a step in flight lands that step first (each pending token is
    keyed by its step, so tokens can never land out of order)."""
    e, r, expected = _decode_in_flight(engines, [1, 2, 3], max_tokens=10)
    e.async_scheduling = False
    try:
        while e.has_unfinished():
            e.step()
    finally:
        e.async_scheduling = True
    assert r.output_token_ids == expected
    assert_idle(engines[1])


def test_a_failed_launch_keeps_the_step_in_flight(engines):
    """If launching step t+1 raises (say, out of memory), step t is not lost: the next step lands it."""
    e, r, expected = _decode_in_flight(engines, [4, 5, 6], max_tokens=12)
    inflight = e._inflight

    def fail(*args, **kwargs):
        raise MemoryError("simulated: out of device memory")

    e.runner.launch = fail
    try:
        with pytest.raises(MemoryError):
            e.step()
    finally:
        del e.runner.launch
    assert e._inflight is inflight and r.pending
    while e.has_unfinished():
        e.step()
    assert r.output_token_ids == expected
    assert_idle(engines[1])


def test_async_engine_streams_and_aborts_under_async_scheduling(model_dir, engines):
    """The server's loop (AsyncEngine) over an async-scheduling engine: concurrent streams get the
    synchronous engine's tokens; a client leaving early aborts its request with its step in flight."""
    import asyncio

    from deltaserve.engine.async_engine import AsyncEngine

    sync, _ = engines
    prompts = [[7, 8, 9], [10] * 20, [11, 12], [13] * 45, [14]]
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    expected = [o.token_ids for o in sync.generate(prompts, params)]
    ae = AsyncEngine(EngineConfig(model=str(model_dir), max_num_seqs=3, async_scheduling=True))
    assert ae.engine.async_scheduling
    ae.start()

    async def stream(i: int, leave_after: int | None = None) -> list[int]:
        tokens = []
        async for out in ae.generate(prompts[i], params, f"r{i}"):
            tokens += out.delta_token_ids
            if leave_after is not None and len(tokens) >= leave_after:
                break  # the client goes away: the request is aborted
        return tokens

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(stream(i, 4 if i == 1 else None) for i in range(len(prompts))))

    try:
        got = asyncio.run(run())
        for i, (g, want) in enumerate(zip(got, expected)):
            assert g == (want[: len(g)] if i == 1 else want)
        assert len(got[1]) >= 4
        for _ in range(100):  # the abort is applied by the loop thread
            if not ae.num_unfinished and ae.usage()["slots_free"] == ae.usage()["slots_total"]:
                break
            time.sleep(0.05)
        u = ae.usage()
        assert ae.num_unfinished == 0 and u["slots_free"] == u["slots_total"] and u["kv_free"] == u["kv_total"]
    finally:
        ae.shutdown()


def _random_workload(seed: int, max_len: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts, params = [], []
    for _ in range(rng.randrange(3, 9)):
        prompts.append([rng.randrange(5, 1900) for _ in range(min(rng.choice([1, 2, 5, 17, 40, 90]), max_len - 2))])
        kw = {"max_tokens": rng.choice([1, 2, 3, 10, 40, None]), "ignore_eos": rng.random() < 0.5}
        kw.update(temperature=0) if rng.random() < 0.5 else kw.update(temperature=0.9, seed=rng.randrange(1000))
        if rng.random() < 0.3:
            kw["stop_token_ids"] = [rng.randrange(5, 1900) for _ in range(30)]
        if rng.random() < 0.3:
            kw["min_tokens"] = min(rng.randrange(5), kw["max_tokens"] or 5)
        if rng.random() < 0.3:
            kw["logprobs"] = rng.randrange(3)
        if rng.random() < 0.15:
            kw["repetition_penalty"] = 1.3
        params.append(SamplingParams(**kw))
    return prompts, params


@pytest.mark.parametrize("cfg", [
    dict(max_num_seqs=4, max_num_batched_tokens=16, block_size=8, kv_cache_memory=21 * 8 * 2 * 2 * 32 * 4,
         max_model_len=160),  # 20 KV blocks: chunked prefills and preemptions
    dict(max_num_seqs=3, max_num_batched_tokens=9, block_size=8, max_model_len=64),  # the context limit
], ids=["preempting", "short-context"])
def test_random_workloads_match_sync(model_dir, cfg):
    """Random mixes of chunked prompts, decodes, max_tokens (1 to the context), stop ids, min_tokens,
    logprobs, seeds and penalties, under KV pressure: async scheduling gives the synchronous tokens and
    finish reasons, and leaves every slot and block free."""
    sync, asyn = (LLM(str(model_dir), async_scheduling=a, **cfg) for a in (False, True))
    for seed in range(6):
        prompts, params = _random_workload(seed, cfg["max_model_len"])
        for x, y in zip(sync.generate(prompts, params), asyn.generate(prompts, params), strict=True):
            assert (y.token_ids, y.finish_reason) == (x.token_ids, x.finish_reason), (seed, x.request_id)
        assert_idle(asyn)
    if cfg.get("kv_cache_memory"):
        assert asyn.engine.scheduler.num_preemptions > 0
