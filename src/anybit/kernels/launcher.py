"""A Triton kernel launched again and again with the same arguments but a few tensors, without Triton's dispatch.

``fn[grid](*args)`` binds every argument, works out its specialization (each pointer's 16-byte alignment, each
integer's value class), looks the compiled kernel up and launches it: for an empty kernel of 25 arguments
14-31 us of host time beyond the 7-13 us of the launch itself on the H100 machine's CPUs
(``benchmarks/call_overhead.py``, BENCHMARKS.md). Eager decoding makes hundreds of such launches a token. A
``KernelLaunch`` fixes a launch's grid, options and arguments once (a module's weights, shapes and constants);
each call names only the arguments that change (x, y, x's planes). Its first call goes through the JIT and
keeps the compiled kernel; later calls hand it to the kernel's launcher directly (the last step of Triton's
own ``JITFunction.run``) while the changing arguments specialize as they did then -- same dtypes, same 16-byte
alignment of every pointer, same integers -- and the current device is the same; otherwise the call goes
through the JIT again (which compiles or finds the right variant) and that variant is kept. Under the
interpreter (``TRITON_INTERPRET=1``), or where the JIT returns no compiled kernel, every call goes through the
JIT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from triton.runtime import driver

try:  # launch hooks (profilers) are passed on as Triton's own launches pass them
    from triton import knobs
except ImportError:  # pragma: no cover - Triton before 3.4
    knobs = None


def specialization_key(values) -> tuple:
    """What Triton's JIT specializes these non-constexpr arguments on, as a key: a tensor's dtype and
    whether its data pointer is 16-byte aligned; any other value itself (stricter than Triton, which keys
    integers on 1 / multiple of 16 / width: a value that changes only costs a pass through the JIT)."""
    return tuple([(v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, torch.Tensor) else (type(v), v)
                  for v in values])


class KernelLaunch:
    """``fn[grid](*args, **options)`` for ``args`` (every parameter of ``fn`` in order, constexprs
    included) in which only the parameters named in ``changing`` differ from call to call:
    ``launch(*values)`` runs it with those parameters set to ``values``, in that order. An entry of
    ``changing`` may be a tuple of names, which all take its one value (a tensor standing in for
    inputs the kernel does not read, so that the launch keeps no tensor of its own)."""

    def __init__(self, fn, grid: Sequence[int], args: Sequence, options: dict, changing: Sequence[str]):
        names = list(fn.arg_names)
        if len(args) != len(names):
            raise ValueError(f"{len(names)} parameters, {len(args)} arguments")
        self.fn, self.options = fn, dict(options)
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.args = list(args)
        self.slots = [[names.index(n) for n in ((name,) if isinstance(name, str) else name)] for name in changing]
        self.kernel = None  # the compiled kernel of the last pass through the JIT, and what it was made for
        self.key = None
        self.device = None

    def __call__(self, *values) -> None:
        args = self.args.copy()
        for slots, value in zip(self.slots, values):
            for slot in slots:
                args[slot] = value
        key = specialization_key(values)
        if self.kernel is not None and key == self.key:
            device = self._current_device()
            if device == self.device:
                stream = self._current_stream(device)
                enter = knobs.runtime.launch_enter_hook if knobs else None
                leave = knobs.runtime.launch_exit_hook if knobs else None
                # launch_metadata is None without an enter hook (profilers set one)
                metadata = None if enter is None else self.kernel.launch_metadata(self.grid, stream, *args)
                self._run(*self.grid, stream, self._function, self._packed_metadata, metadata, enter, leave, *args)
                return
        self._through_jit(args, key)

    def _through_jit(self, args: list, key: tuple) -> None:
        kernel = self.fn[self.grid](*args, **self.options)
        if hasattr(kernel, "result"):  # a compilation still under way
            kernel = kernel.result()
        if hasattr(kernel, "packed_metadata") and hasattr(kernel, "launch_metadata"):
            # what every direct launch reads, looked up once (each is an attribute or property lookup)
            self._current_device = driver.active.get_current_device
            self._current_stream = driver.active.get_current_stream
            self._run, self._function, self._packed_metadata = kernel.run, kernel.function, kernel.packed_metadata
            self.kernel, self.key, self.device = kernel, key, self._current_device()
        else:  # the interpreter, or a Triton whose JIT hands back no compiled kernel
            self.kernel = self.key = self.device = None
