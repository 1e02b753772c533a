"""Quantization methods: short recipes composed from the pure parts in ``anybit.quant``.

A method is an object with ``name`` and ``quantize(weight, stats) -> QuantizedWeight``
(``stats``: ``anybit.pipeline.LinearStats``). ``build_method`` checks the user's settings.
"""

from __future__ import annotations

import inspect

from anybit.errors import AnybitError
from anybit.methods.baselines import GPTQ, RTN, SqueezeLLM
from anybit.methods.claq import CLAQ
from anybit.methods.cmpq import CMPQ
from anybit.methods.skim import SKIM
from anybit.methods.slim import SliM

METHODS = {cls.name: cls for cls in (RTN, GPTQ, SqueezeLLM, SKIM, SliM, CMPQ, CLAQ)}


def build_method(name: str, bits: float, group_size: int = 0, **options):
    if name not in METHODS:
        raise AnybitError(f"unknown method {name!r}: choose from {', '.join(sorted(METHODS))}")
    factory = METHODS[name].from_options
    known = [p.name for p in inspect.signature(factory).parameters.values()
             if p.kind is not p.VAR_KEYWORD and p.name not in ("bits", "group_size")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise AnybitError(f"method {name} has no option {', '.join(unknown)} (options: {', '.join(known) or 'none'})")
    return factory(bits=bits, group_size=group_size, **options)
