"""Wall time per quantization stage, for the reports and the speed benchmark.

``recording(timings)`` makes ``stage(name)`` blocks (and functions decorated with ``timed``)
add their wall time to ``timings``; outside a recording they cost nothing. Nested stages are
recorded under their path (``quantize/kmeans``), so a parent's time includes its children's.
CUDA work is asynchronous, so each boundary synchronises the device when CUDA is in use: the
time lands in the stage that queued the work, not in whichever stage next waits for it.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_timings: ContextVar[dict | None] = ContextVar("anybit_timings", default=None)
_path: ContextVar[str] = ContextVar("anybit_stage_path", default="")


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def recording(timings: dict):
    """Record the stages run inside this block into ``timings`` (name -> seconds, summed)."""
    token = _timings.set(timings)
    try:
        yield timings
    finally:
        _timings.reset(token)


@contextmanager
def stage(name: str):
    timings = _timings.get()
    if timings is None:
        yield
        return
    path = f"{_path.get()}/{name}" if _path.get() else name
    token = _path.set(path)
    _sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        timings[path] = timings.get(path, 0.0) + time.perf_counter() - t0
        _path.reset(token)


def timed(name: str):
    """Decorator form of ``stage``."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)
        return run
    return wrap
