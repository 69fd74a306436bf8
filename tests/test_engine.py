"""The engine on the CPU: batching, chunked prefill, preemption, sampling, stops, aborts, bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch
import transformers as tf

from deltaserve import LLM, SamplingParams
from deltaserve.errors import ConfigError, InvalidRequestError, PromptTooLongError
from deltaserve.models.make_model import make_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), dtype="float32", seed=7)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(model_dir, request):
    """The engine both ways: each step landed before the next is scheduled, and async scheduling (the
    GPU default: step t+1 launched before step t lands)."""
    return LLM(str(model_dir), max_num_seqs=8, async_scheduling=request.param)


def assert_pools_full(llm: LLM) -> None:
    u = llm.engine.usage()
    assert (u["running"], u["waiting"]) == (0, 0)
    assert u["kv_free"] == u["kv_total"] and u["slots_free"] == u["slots_total"]


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 1900) for _ in range(rng.choice([1, 3, 17, 40, 64, 65, 90]))] for _ in range(n)]


def test_batched_greedy_equals_single_and_transformers(llm, model_dir):
    prompts = _prompts(8)
    batched = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert batched == alone
    hf = tf.Qwen3_5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p, ours in zip(prompts[:3], batched):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert ours == ref
    assert_pools_full(llm)


def test_chunked_prefill_equals_unchunked(model_dir, llm):
    prompts = _prompts(4, seed=1) + [list(range(10, 300))]
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    small = LLM(str(model_dir), max_num_seqs=4, max_num_batched_tokens=16,
                async_scheduling=llm.engine.async_scheduling)
    assert [o.token_ids for o in small.generate(prompts, GREEDY)] == expected
    assert_pools_full(small)


def test_preemption_recomputes_to_the_same_output(model_dir, llm):
    prompts = _prompts(6, seed=2)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    # 20 blocks of 8 tokens: 6 requests of up to 150 tokens cannot all fit, so some get preempted.
    tiny_kv = LLM(str(model_dir), max_num_seqs=6, block_size=8, kv_cache_memory=21 * 8 * 2 * 2 * 32 * 4,
                  max_model_len=160, async_scheduling=llm.engine.async_scheduling)
    assert tiny_kv.engine.runner.kv.num_blocks == 20
    got = [o.token_ids for o in tiny_kv.generate(prompts, params)]
    assert got == expected
    assert tiny_kv.engine.scheduler.num_preemptions > 0
    assert_pools_full(tiny_kv)


def test_seeded_sampling_is_independent_of_the_batch(llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, min_p=0.01, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = [11, 22, 33, 44]
    alone = llm.generate([prompt], p)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    mixed = llm.generate([[7, 8], prompt, [9] * 30, [5]], [others[0], p, others[1], others[2]])
    assert mixed[1].token_ids == alone
    again = llm.generate([prompt, prompt], [p, SamplingParams(temperature=0, max_tokens=16)])
    assert again[0].token_ids == alone
    unseeded = llm.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in unseeded}) > 1  # sampling does sample


def test_stop_token_ids_and_min_tokens(llm):
    prompt = [100, 200, 300]
    free = llm.generate([prompt], GREEDY)[0].token_ids
    stop_at = free[5]
    first = free.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[: first + 1]
    # min_tokens bans the stop id until that many tokens are out.
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_at],
                                                min_tokens=first + 2))[0]
    assert len(out.token_ids) >= first + 2 and stop_at not in out.token_ids[: first + 1]


def test_eos_and_ignore_eos(llm):
    eos = llm.engine.model_config.eos_token_ids
    assert eos, "the demo model declares EOS ids in generation_config.json"
    prompt = [100, 200, 300]
    free = llm.generate([prompt], GREEDY)[0].token_ids
    # Make an EOS id of a fresh engine the model's 4th greedy token: EOS stops unless ignore_eos.
    llm.engine.model_config.__dict__["eos_token_ids"] = (free[3],)
    try:
        stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
        ignored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    finally:
        llm.engine.model_config.__dict__["eos_token_ids"] = eos
    assert stopped.finish_reason == "stop" and stopped.token_ids == free[: free.index(free[3]) + 1]
    assert ignored.finish_reason == "length" and ignored.token_ids == free


def test_stop_strings(llm):
    prompt = "Write a 1000-word story about a cat."
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].text
    stop = free[10:13]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == free[: free.index(stop)]
    inc = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=stop, ignore_eos=True,
                                                include_stop_str_in_output=True))[0]
    assert inc.text == free[: free.index(stop) + len(stop)]


def test_logprobs_are_consistent(llm):
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.7, seed=5, max_tokens=8, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp["token"] == tok and lp["logprob"] <= 0 and len(lp["top"]) == 3
        assert lp["top"][0][1] >= lp["logprob"] - 1e-6  # nothing beats the top-1
        assert math.isclose(sum(math.exp(v) for _, v in lp["top"]) <= 1.0 + 1e-5, True)
    greedy = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, logprobs=1))[0]
    for tok, lp in zip(greedy.token_ids, greedy.logprobs):
        assert lp["top"][0][0] == tok


def test_abort_storm_frees_everything(llm):
    engine = llm.engine
    rng = random.Random(0)
    reqs = []
    for i, p in enumerate(_prompts(50, seed=3)):
        r = engine.make_request(p, SamplingParams(temperature=0, max_tokens=rng.randrange(5, 40), ignore_eos=True),
                                request_id=f"storm-{i}")
        engine.add_request(r)
        reqs.append(r.request_id)
    live = list(reqs)
    while live:
        if rng.random() < 0.5:
            victim = live.pop(rng.randrange(len(live)))
            engine.abort(victim)  # waiting, mid prefill or decoding: whatever it is doing
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
        if not engine.has_unfinished():
            live = []
    assert_pools_full(llm)
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=4))[0].finish_reason == "length"


def test_bad_requests_raise_typed_errors(llm):
    n = llm.engine.max_model_len
    with pytest.raises(PromptTooLongError, match=rf"maximum context length is {n}.*{n + 5}"):
        llm.generate([[1] * (n + 5)])
    capped = llm.engine.make_request([1] * (n - 3), SamplingParams(max_tokens=100))
    assert capped.max_tokens == 3
    for bad, field in [("", "prompt"), ([], "prompt"), ([1, 10**9], "prompt"), ([-1], "prompt")]:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate([bad])
        assert e.value.param == field
    for kw, field in [({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                      ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
                      ({"max_tokens": 0}, "max_tokens"), ({"min_p": -0.1}, "min_p"),
                      ({"repetition_penalty": 0}, "repetition_penalty"), ({"logprobs": 99}, "logprobs")]:
        with pytest.raises(InvalidRequestError, match=field) as e:
            SamplingParams(**kw)
        assert e.value.param == field
    assert_pools_full(llm)


def test_bad_engine_config_names_the_field(model_dir):
    with pytest.raises(ConfigError, match="max_num_seqs=0"):
        LLM(str(model_dir), max_num_seqs=0)
    with pytest.raises(ConfigError, match="inproj='fast'"):
        LLM(str(model_dir), inproj="fast")
    with pytest.raises(ConfigError, match="max_model_len=100000 does not fit"):
        LLM(str(model_dir), max_model_len=100000, kv_cache_memory=2**20)


def test_repetition_penalty_changes_greedy_output(llm):
    prompt = [5, 6, 7, 8]
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].token_ids
    pen = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                repetition_penalty=5.0))[0].token_ids
    assert len(set(pen)) >= len(set(plain))


def test_start_up_warm_shapes_fit_the_limits_and_run(model_dir):
    from deltaserve.engine.runner import warmup_batches

    for seqs, tokens in ((1, 64), (4, 512), (16, 2048), (64, 8192)):
        batches = warmup_batches(seqs, tokens, 16)
        assert batches and all(len(b) <= seqs and sum(t for t, _ in b) <= tokens for b in batches)
        for b in batches:  # decodes (one token with context) lead, and no prompt carries context
            kinds = [t == 1 and c > 0 for t, c in b]
            assert kinds == sorted(kinds, reverse=True) and all(c < 16 for _, c in b)
    assert any(len(b) > 1 for b in warmup_batches(16, 2048, 16))
    # The GPU runs these at start-up on throw-away caches; the same code runs on the CPU reference path.
    llm = LLM(str(model_dir), device="cpu", dtype="float32", max_num_seqs=16, max_num_batched_tokens=2048)
    runner, seen = llm.engine.runner, []
    forward = runner._forward
    runner._forward = lambda seqs, sample_rows: seen.append(len(seqs)) or forward(seqs, sample_rows)
    runner._warm_step_shapes(2048)
    assert seen == [len(b) for b in warmup_batches(16, 2048, runner.block_size)]
    assert all(layer.ssm_state is None for layer in runner.model.gdn_layers())  # the throw-away caches are let go
    llm.shutdown()


def test_boolean_flags_turn_on_and_off_from_the_cli():
    import argparse

    from deltaserve.config import EngineConfig

    p = argparse.ArgumentParser()
    EngineConfig.add_cli_args(p)
    default = EngineConfig.from_cli_args(p.parse_args([]))
    assert default.prefill_cuda_graphs and not default.enforce_eager
    off = EngineConfig.from_cli_args(p.parse_args(["--no-prefill-cuda-graphs", "--enforce-eager"]))
    assert not off.prefill_cuda_graphs and off.enforce_eager


def test_prefill_graph_eligibility_and_sizes(monkeypatch):
    from deltaserve.config import EngineConfig
    from deltaserve.engine.batch import SeqInput
    from deltaserve.engine.cuda_graph import PrefillGraphs

    cfg = EngineConfig(model="x", device="cpu", prefill_cuda_graphs=True)
    assert cfg.prefill_graph_sizes() == []  # never on the CPU (no graphs there)
    monkeypatch.setattr(EngineConfig, "graph_sizes", lambda self: [1, 2])
    assert cfg.prefill_graph_sizes() == [16, 32, 64]
    cfg.max_num_batched_tokens = 40
    assert cfg.prefill_graph_sizes() == [16, 32]
    cfg.prefill_cuda_graphs = False
    assert cfg.prefill_graph_sizes() == []
    pg = PrefillGraphs(None, [16, 32, 64], max_blocks=4, block_size=16, pool=None, device=torch.device("cpu"))
    fresh = SeqInput(list(range(30)), 0, 1, [3, 4])
    assert pg.can_run([fresh])
    assert not pg.can_run([fresh, SeqInput([7], 0, 2, [5])])  # one prompt per graph
    assert not pg.can_run([SeqInput(list(range(30)), 16, 1, [3, 4, 5])])  # a later chunk (has context)
    assert pg.can_run([SeqInput(list(range(63)), 0, 1, [3, 4, 5, 6])])
    # The padding is a never-empty dummy sequence: a prompt needs a graph strictly larger than itself.
    assert not pg.can_run([SeqInput(list(range(64)), 0, 1, [3, 4, 5, 6])])
    assert not pg.can_run([SeqInput(list(range(10)), 0, 1, [1, 2, 3, 4, 5])])  # more blocks than the table holds
