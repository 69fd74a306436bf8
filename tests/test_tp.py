"""Tensor parallelism on the CPU over gloo: tp=2 computes what tp=1 computes."""

from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch
from model_utils import Runner, add_demo_tokenizer, randomize_
from test_model_parity import build_hf

from deltaserve import LLM, SamplingParams
from deltaserve.errors import ConfigError
from deltaserve.layers.inproj import InProjPlan
from deltaserve.models.loader import load_model

KINDS = ["qwen3_5", "qwen3_5_moe", "qwen3_next"]
MODES = ["serial", "dual", "fused"]
KV1 = "qwen3_5_kv1"  # one KV head for four query heads: both ranks hold a copy of it
PROMPT = list(range(3, 44))


def _logits(model_dir, mode: str) -> torch.Tensor:
    """Prefill logits of PROMPT followed by 5 decode steps' logits."""
    runner = Runner(load_model(model_dir, dtype=torch.float32, plan=InProjPlan(mode)))
    seq, out = runner.prefill(PROMPT)
    steps = [out]
    for t in (7, 8, 9, 10, 11):
        steps.append(runner.step([(seq, [t])]))
    return torch.cat(steps)


def _rank_main(rank: int, port: int, jobs: list, results) -> None:
    from deltaserve.distributed import exit_worker, init_tp, shutdown_tp

    init_tp(rank, 2, port, "cpu")
    for key, model_dir, mode in jobs:
        logits = _logits(model_dir, mode)
        if rank == 0:
            results.put((key, logits.numpy()))  # plain arrays: tensors would travel as fds that die with the rank
    shutdown_tp()
    results.close()
    results.join_thread()  # the queue's feeder thread has handed everything over
    exit_worker()  # as the engine's TP workers end: no interpreter teardown after the process group


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for kind in [*KINDS, KV1]:
        torch.manual_seed(0)
        hf = (build_hf("qwen3_5", num_key_value_heads=1) if kind == KV1 else build_hf(kind)).eval()
        randomize_(hf)
        d = tmp_path_factory.mktemp(f"tp-{kind}")
        hf.save_pretrained(d, max_shard_size="150KB")
        add_demo_tokenizer(d)
        out[kind] = d
    return out


def test_tp2_logits_equal_tp1_for_every_model_and_inproj(checkpoints):
    jobs = [(f"{k}/{m}", str(checkpoints[k]), m) for k in KINDS for m in MODES]
    jobs.append((f"{KV1}/fused", str(checkpoints[KV1]), "fused"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, jobs, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {k: torch.from_numpy(v) for k, v in (results.get(timeout=300) for _ in jobs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for key, model_dir, mode in jobs:
        ref = _logits(model_dir, mode)
        err = ((got[key] - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, f"{key}: tp=2 vs tp=1 relative error {err:.2e}"
        assert torch.equal(got[key].argmax(-1), ref.argmax(-1)), key


@pytest.mark.parametrize("Hq,Hkv,tp", [(4, 2, 2), (4, 1, 2), (4, 2, 4), (8, 2, 4), (16, 2, 8)])
def test_qkv_proj_rank_holds_its_query_heads_and_the_kv_heads_they_read(Hq, Hkv, tp):
    """The merged q/k/v weight of each rank, loaded from q_proj, k_proj, v_proj (KV split or replicated)."""
    from deltaserve.distributed import set_tp
    from deltaserve.layers.linear import QKVParallelLinear

    H, D = 8, 4
    g = torch.Generator().manual_seed(0)
    q_proj, k_proj, v_proj = (torch.randn(n * D, H, generator=g) for n in (2 * Hq, Hkv, Hkv))
    for rank in range(tp):
        set_tp(rank, tp)
        try:
            qkv = QKVParallelLinear(H, Hq, Hkv, D)
        finally:
            set_tp(0, 1)
        for shard, w in (("q", q_proj), ("k", k_proj), ("v", v_proj)):
            qkv.weight.weight_loader(qkv.weight, w, shard, name=f"{shard}_proj")
        heads = list(range(rank * Hq // tp, (rank + 1) * Hq // tp))
        kv_heads = sorted({h // (Hq // Hkv) for h in heads})  # GQA: the KV heads these query heads read
        assert qkv.num_heads == len(heads) and qkv.num_kv_heads == len(kv_heads)
        q_rows = q_proj.view(Hq, 2 * D, H)[heads].flatten(0, 1)
        k_rows, v_rows = (w.view(Hkv, D, H)[kv_heads].flatten(0, 1) for w in (k_proj, v_proj))
        want = torch.cat([q_rows, k_rows, v_rows])
        assert torch.equal(qkv.weight, want)


def test_tp2_engine_generates_like_tp1(checkpoints):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)
    prompts = [PROMPT, [5, 6, 7], list(range(20, 90))]
    model_dir = str(checkpoints["qwen3_5_moe"])
    single = LLM(model_dir, max_num_seqs=4).generate(prompts, params)
    with LLM(model_dir, max_num_seqs=4, tensor_parallel_size=2) as llm:
        workers = llm.engine.runner.workers
        double = llm.generate(prompts, params)
    assert not any(w.is_alive() for w in workers)  # no orphans once the engine shuts down
    for a, b in zip(single, double):
        assert a.token_ids == b.token_ids
        assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_tp_that_does_not_divide_the_heads_is_refused(checkpoints):
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        LLM(str(checkpoints["qwen3_5"]), tensor_parallel_size=3)
