"""The gated attention layer wired to its Triton kernels (interpreter on CPU) == the same layer on the references.

The kernels are tested one by one elsewhere; this checks the layer's plumbing between them: the merged qkv
layout, the gate read in place, decode rows first and prefill rows after in one mixed step.
"""

from __future__ import annotations

import functools

import pytest
import torch
from model_utils import Runner

from deltaserve.models.loader import load_model
from deltaserve.models.make_model import make_model
from deltaserve.ops import paged_attention, qk_norm_rope

pytest.importorskip("triton")
# CPU tensors through Triton's interpreter; on a GPU, test_engine_gpu.py runs the layer's kernels for real.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="an interpreter test (CPU tensors)")


def _run(model_dir) -> torch.Tensor:
    runner = Runner(load_model(model_dir, dtype=torch.float32))
    a, first = runner.prefill(list(range(3, 23)))
    b, _ = runner.prefill([7, 8, 9])
    mixed = runner.step([(a, [5]), (b, [6]), (runner.new_seq(16), [1, 2, 3, 4])])  # 2 decodes + a prefill
    return torch.cat([first, mixed, runner.step([(a, [11]), (b, [12])])])


def test_layer_on_triton_kernels_equals_layer_on_references(tmp_path, monkeypatch):
    model_dir = make_model("tiny", tmp_path, dtype="float32")  # 3 GDN layers + 1 attention layer
    ref = _run(model_dir)
    for module, name in ((qk_norm_rope, "qk_norm_rope_store"), (paged_attention, "paged_attention_decode"),
                         (paged_attention, "paged_attention_prefill")):  # fmt: skip
        monkeypatch.setattr(module, name, functools.partial(getattr(module, name), force_triton=True))
    got = _run(model_dir)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
