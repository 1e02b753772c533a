"""``AnybitLinear`` under ``torch.compile``: one opaque op a call.

Dynamo cannot trace the kernel path (buffer pointers key the cached operands, launches go through
Triton's compiled launchers), and a graph break at every linear would leave each call eager between
compiled pieces. So under ``torch.compile`` a module's forward is one custom op, ``anybit::linear(x,
layer)``, whose implementation runs the module's eager forward and whose fake one gives the output's
shape: the compiled graph holds the call as a unit, and with ``mode="reduce-overhead"`` (what
``transformers``' ``generate`` uses for a static cache) the CUDA graph records its launches like any
other kernel's. ``layer`` is an integer naming the module in a registry of live modules (weak
references), since a custom op takes tensors and plain values only. (x's planes stay inside the op:
as an op of their own they were made once a linear all the same -- the compiled inference graph does
not merge equal calls of custom ops -- so q/k/v each make theirs, as in eager calls.)
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

_LAYERS: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register(module: torch.nn.Module) -> int:
    """A fresh id naming ``module`` for ``linear`` (modules call this when made, copied or unpickled)."""
    layer = next(_NEXT_ID)
    _LAYERS[layer] = module
    return layer


def _module(layer: int) -> torch.nn.Module:
    module = _LAYERS.get(layer)
    if module is None:
        raise RuntimeError(f"anybit::linear: layer {layer} no longer exists")
    return module


@torch.library.custom_op("anybit::linear", mutates_args=())
def linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    """The forward of the module registered as ``layer`` (its eager path: kernels or the pure-torch one)."""
    return _module(layer).eager_forward(x)


@linear.register_fake
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    module = _module(layer)
    # CUDA graph trees run a compiled function's first call inside the graph's memory pool and refuse
    # allocations left alive there that are not outputs: what the first call of a shape keeps (tiled
    # codes, the split-K workspace of its size) must exist before. Tracing, which calls this, comes
    # first: one real call on zeros of x's shape makes it all (and compiles the kernels). A symbolic
    # shape (dynamic=True) has no size: one row then (launch plans keep no tensor of their own). The
    # pure-torch path keeps nothing, so it is not called (it would decode the whole weight).
    static = all(isinstance(n, int) for n in x.shape)
    with unset_fake_temporarily():
        if module.uses_kernel(x):
            shape = x.shape if static else (1, module.in_features)
            module.eager_forward(torch.zeros(shape, dtype=x.dtype, device=x.device))
    return x.new_empty(x.shape[:-1] + (module.out_features,))
