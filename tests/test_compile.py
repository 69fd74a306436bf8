"""Regional compilation: the opaque layer argument lets every GDN layer share one compiled graph.

With a layer-name *string* baked into the custom ops' arguments, dynamo specialises on it and
recompiles each layer (the regression vLLM hit in #38152). Graphs are counted with dynamo's
counters; the eager backend stops after dynamo, which is where the specialisation happens.
"""

from __future__ import annotations

import pytest
import torch
from model_utils import Runner

from deltaserve.engine.compile import compile_layers, compiled_graph_count
from deltaserve.layers import layer_ref
from deltaserve.layers.inproj import InProjPlan
from deltaserve.models.loader import load_model
from deltaserve.models.make_model import make_model


def _graphs(model_dir, mode: str) -> tuple[int, float]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer_ref.set_layer_arg(mode)
    try:
        model = load_model(model_dir, dtype=torch.float32, plan=InProjPlan("dual"))
    finally:
        layer_ref.set_layer_arg("opaque")
    ids = list(range(1, 30))
    _, eager = Runner(model).prefill(ids)
    compile_layers(model, backend="eager")
    runner = Runner(model)
    seq, compiled = runner.prefill(ids)
    runner.step([(seq, [5])])  # a decode step too (T=1 is its own specialisation)
    err = ((compiled - eager).abs().max() / eager.abs().max()).item()
    return compiled_graph_count(), err


@pytest.mark.skipif(not layer_ref.HAS_OPAQUE, reason="torch without opaque objects")
def test_opaque_layer_argument_shares_one_graph_per_layer_kind(tmp_path):
    shallow = make_model("tiny", tmp_path / "l4", layers=4, dtype="float32")  # 3 GDN + 1 attention
    deep = make_model("tiny", tmp_path / "l12", layers=12, dtype="float32")  # 9 GDN + 3 attention
    n4, err4 = _graphs(shallow, "opaque")
    n12, err12 = _graphs(deep, "opaque")
    # {layer 0 (no residual yet), other GDN layers, attention} x {prefill, decode}: independent of depth.
    assert n4 == n12 == 6
    assert err4 < 1e-6 and err12 < 1e-6


def test_string_layer_argument_recompiles_every_layer(tmp_path):
    deep = make_model("tiny", tmp_path / "l12", layers=12, dtype="float32")
    n, err = _graphs(deep, "string")
    assert n == 2 * 12  # every layer, for prefill and again for decode
    assert err < 1e-6


def test_layer_arg_option_reaches_the_layers(tmp_path):
    """``layer_arg="string"`` (the flag `bench startup --layer-arg string` uses) builds name-arg layers;
    the default mode is restored afterwards, so later engines get opaque handles again."""
    from deltaserve import LLM, SamplingParams

    tiny = make_model("tiny", tmp_path / "m", layers=4, dtype="float32")
    llm = LLM(str(tiny), max_num_seqs=2, layer_arg="string")
    gdn = llm.engine.runner.model.gdn_layers()[0]
    assert isinstance(gdn.layer, str)
    assert llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids
    if layer_ref.HAS_OPAQUE:
        again = LLM(str(tiny), max_num_seqs=2)
        assert isinstance(again.engine.runner.model.gdn_layers()[0].layer, layer_ref.LayerRef)


def test_custom_ops_are_graph_nodes_under_compile_and_plain_calls_in_eager(monkeypatch):
    # Eager calls skip the dispatcher (~50 µs of host time each); torch.compile must still see one node.
    from deltaserve.layers import norm

    x, w = torch.randn(3, 8), torch.randn(8)
    calls = []
    body = norm._rms_norm.fn
    monkeypatch.setattr(norm._rms_norm, "fn", lambda *a: calls.append("body") or body(*a))
    expected = torch.ops.deltaserve.rms_norm(x, w, 1e-6)
    calls.clear()
    torch.testing.assert_close(norm._rms_norm(x, w, 1e-6), expected)
    assert calls == ["body"]  # called directly, not through torch.ops
    graphs = []

    def backend(gm, _inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(lambda a: norm._rms_norm(a, w, 1e-6), backend=backend)(x), expected)
    assert len(graphs) == 1 and "deltaserve.rms_norm" in graphs[0]
