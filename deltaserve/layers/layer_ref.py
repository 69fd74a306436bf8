"""How a custom op finds "its" layer without torch.compile specialising on the layer.

Custom ops that need a layer's state (the GDN core, attention, the dual-stream in_proj) take the layer
as an argument. On torch >= 2.11 that argument is a :class:`LayerRef`, registered as a *reference*
opaque type: torch.compile lifts it to a graph input, so every GDN layer shares one compiled graph
(the fix vLLM needed after #38152). On older torch, or when ``set_layer_arg("string")`` asks for it,
the argument is the layer's name, a constant baked into the graph: compile then specialises, i.e.
recompiles, once per layer -- kept so a test can demonstrate the difference.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

try:  # torch >= 2.11
    from torch._library.opaque_object import MemberType, get_opaque_type_name, register_opaque_type
    from torch._opaque_base import OpaqueBase

    HAS_OPAQUE = True
except ImportError:  # pragma: no cover - old torch
    OpaqueBase = object  # type: ignore[misc,assignment]
    HAS_OPAQUE = False


class LayerRef(OpaqueBase):  # type: ignore[misc]
    """A handle on a layer, plus the static sizes fake (meta) kernels need to shape their outputs.

    ``sizes`` come from the config for this TP rank, never from ``weight.shape`` (a packed or quantised
    weight's shape says nothing about the output). The handle holds only a unique name and the sizes --
    the module itself is found through a weak registry -- so compile caches that copy or pickle their
    graphs' opaque constants (torch 2.11's inductor does) copy a few bytes, not a layer's weights.
    """

    def __init__(self, name: str, sizes: dict[str, int]):
        self.name = name
        self.sizes = sizes

    @property
    def module(self) -> nn.Module:
        module = _MODULES[self.name]()
        if module is None:
            raise RuntimeError(f"layer {self.name} no longer exists")
        return module

    def __deepcopy__(self, memo) -> LayerRef:
        return self  # immutable handle: a copy is the same handle

    def __reduce__(self):
        return (LayerRef, (self.name, self.sizes))


_MODULES: dict[str, weakref.ref] = {}
_REGISTRY: dict[str, LayerRef] = {}
_COUNTER = itertools.count()
_MODE = "opaque" if HAS_OPAQUE else "string"

if HAS_OPAQUE:
    try:
        register_opaque_type(LayerRef, typ="reference", members={"sizes": MemberType.USE_REAL})
    except TypeError:  # pragma: no cover - an early 2.11 without `members`
        HAS_OPAQUE, _MODE = False, "string"
if not HAS_OPAQUE:
    logger.info("torch %s has no opaque objects: custom ops take layer names, so --compile specialises "
                "(recompiles) per layer", torch.__version__)


def set_layer_arg(mode: str) -> None:
    """``"opaque"`` (default when supported) or ``"string"``; applies to layers built afterwards."""
    global _MODE
    if mode not in ("opaque", "string"):
        raise ValueError(f"layer argument mode {mode!r} must be 'opaque' or 'string'")
    if mode == "opaque" and not HAS_OPAQUE:
        raise ValueError(f"torch {torch.__version__} has no opaque objects: use 'string'")
    _MODE = mode


@contextlib.contextmanager
def layer_arg_mode(mode: str) -> Iterator[None]:
    """Build layers under ``mode`` (``"auto"``: the default), then restore the previous mode."""
    previous = _MODE
    if mode != "auto":
        set_layer_arg(mode)
    try:
        yield
    finally:
        set_layer_arg(previous)


def layer_arg(module: nn.Module, prefix: str, sizes: dict[str, int]) -> LayerRef | str:
    """What a layer passes to its custom ops: a LayerRef, or its unique name in string mode.

    Names are made unique per process (several models may be alive at once, e.g. in tests).
    """
    name = f"{prefix}#{next(_COUNTER)}"
    _MODULES[name] = weakref.ref(module, lambda _, n=name: (_MODULES.pop(n, None), _REGISTRY.pop(n, None)))
    ref = LayerRef(name, sizes)
    _REGISTRY[name] = ref
    return ref if _MODE == "opaque" else name


def resolve(arg: LayerRef | str) -> LayerRef:
    return _REGISTRY[arg] if isinstance(arg, str) else arg


_DISPATCH_ALWAYS = False  # see dispatch_custom_ops


@contextlib.contextmanager
def dispatch_custom_ops() -> Iterator[None]:
    """Route eager calls through the registered ops as well, so that a profiler sees one named op per
    call (``bench profile`` on the CPU classifies time by op name)."""
    global _DISPATCH_ALWAYS
    saved, _DISPATCH_ALWAYS = _DISPATCH_ALWAYS, True
    try:
        yield
    finally:
        _DISPATCH_ALWAYS = saved


class CompileOp:
    """A custom op that only torch.compile goes through; eager calls (and CUDA-graph captures) run the
    Python body directly.

    ``torch.library.custom_op`` makes torch.compile see one opaque node, which is why our kernels are
    registered as ops. Outside compile the dispatcher round trip buys nothing and costs ~50 µs of host
    time per call on a small CPU: ~260 calls in an eager 40-layer prefill step.
    Use as ``@CompileOp.define("deltaserve::name")``; ``.register_fake`` as on the op.
    """

    def __init__(self, qualname: str, fn: Callable, mutates_args=(), schema: str | None = None):
        self.fn = fn
        self.op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args, schema=schema)
        self.namespace, self.name = qualname.split("::")
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    @classmethod
    def define(cls, qualname: str, mutates_args=()) -> Callable[[Callable], CompileOp]:
        return lambda fn: cls(qualname, fn, mutates_args)

    def register_fake(self, fake: Callable) -> Callable:
        self.op.register_fake(fake)
        return fake

    def __call__(self, *args):
        if _DISPATCH_ALWAYS or torch.compiler.is_compiling():
            return getattr(getattr(torch.ops, self.namespace), self.name)(*args)
        return self.fn(*args)


_EAGER: dict[str, Callable] = {}  # op name -> its Python body, for layer_op outside compile


def define_layer_op(name: str, tensor_args: str, returns: str, impl: Callable, fake: Callable) -> None:
    """Register ``deltaserve::<name>`` (LayerRef argument) and ``deltaserve::<name>_str`` (string).

    ``impl(*tensors, ref)`` and ``fake(*tensors, ref)`` receive a resolved :class:`LayerRef` (in fake
    mode a stand-in whose ``sizes`` are real).
    """

    def str_impl(*args):
        return impl(*args[:-1], resolve(args[-1]))

    def str_fake(*args):
        return fake(*args[:-1], resolve(args[-1]))

    _EAGER[name], _EAGER[f"{name}_str"] = impl, str_impl
    variants = [(f"{name}_str", "str", str_impl, str_fake)]
    if HAS_OPAQUE:
        variants.append((name, get_opaque_type_name(LayerRef), impl, fake))
    for op_name, typ, fn, fake_fn in variants:
        op = torch.library.custom_op(
            f"deltaserve::{op_name}", fn, mutates_args=(), schema=f"({tensor_args}, {typ} layer) -> {returns}"
        )
        op.register_fake(fake_fn)


def layer_op(name: str, arg: LayerRef | str):
    """The op matching ``arg``'s kind: the registered op under torch.compile, its Python body otherwise
    (see :class:`CompileOp`)."""
    name = name if not isinstance(arg, str) else f"{name}_str"
    if _DISPATCH_ALWAYS or torch.compiler.is_compiling():
        return getattr(torch.ops.deltaserve, name)
    return _EAGER[name]
