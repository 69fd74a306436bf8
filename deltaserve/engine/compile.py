"""Regional compilation: ``torch.compile`` each decoder layer, not the whole model.

Every decoder layer runs the same code, so dynamo compiles it once per *kind* of layer (GDN or
attention) and reuses that graph for the others -- cold compile time does not grow with depth --
provided nothing layer-specific is baked into the graph. That is why the custom ops take a
:class:`~deltaserve.layers.layer_ref.LayerRef` (an opaque graph input), not a layer-name string.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> None:
    """``backend="eager"`` stops after dynamo (tests count graphs without paying for inductor)."""
    # Dynamic token counts: one graph serves every prefill size (and, specialised, T=1 decodes).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in model.model.layers:
        layer.compile(dynamic=True, backend=backend)
    logger.info("compiling %d decoder layers (regional torch.compile)", len(model.model.layers))


def compiled_graph_count() -> int:
    """Graphs dynamo has produced in this process so far (``unique_graphs``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
