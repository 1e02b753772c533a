"""CPU time of one eager call of ``AnybitLinear`` at batch 1 and of the layers under it, against torch's
``F.linear``: what launching costs when no CUDA graph hides it (``transformers``' eager ``generate``).

    cd benchmarks && python3 call_overhead.py --out $OUT    # H100 machine: ~30 s

Shapes small enough (4096x4096) that the GPU is never the bottleneck: each figure is the host time of
N calls in a row divided by N (the queue of launches never fills), then the device is synchronised.
Rows: the module's forward with and without x's planes given (its launches planned on its first call:
``kernels.plan_linear_blocks``); three of the forward's steps besides the launches (the kernel-or-dense
check, the kept kernel operands' validity check, allocating the output); each layer of the unplanned
call on its own (``lut_linear_blocks``, ``triton_lut.launch_blocks``, ``triton_bmma.launch``,
``xplanes.x_planes``); the two planned launches (``triton_bmma.BmmaLaunch``, ``xplanes.XPlanesLaunch``)
made once and called; and, for scale, launches of an empty Triton kernel with 1 and with 25 arguments,
the latter also through its compiled kernel's launcher directly. Writes ``call_overhead.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from decode import random_anybit_linear  # (decode puts src on the path)
from random_llama import mix_of

import anybit.kernels as ak
from anybit.kernels import triton_bmma, triton_lut, xplanes

CALLS = 3000


@triton.jit
def _empty_kernel(a):
    pass


@triton.jit
def _empty_kernel_25(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
                     a21, a22, a23, a24, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr):
    pass


def host_us(fn, calls: int | None = None) -> float:
    """Host microseconds a call of fn, over ``calls`` (default CALLS) calls after 50 warm-up calls."""
    calls = calls or CALLS
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return us


def _direct_launch(args, constants):
    """A call that runs ``_empty_kernel_25``'s compiled kernel for ``args`` straight through its launcher
    (Triton 3.6's ``CompiledKernel.run``, as ``JITFunction.run`` ends), skipping the argument binding and
    the cache lookup: what a launch costs once its specialization is known."""
    from triton.runtime import driver

    kernel = _empty_kernel_25[(1,)](*args, **dict(zip(("C0", "C1", "C2"), constants)))
    device = torch.cuda.current_device()

    def call():
        stream = driver.active.get_current_stream(device)
        kernel.run(1, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *constants)

    return call


def measure(width: str, size: int = 4096, device: str = "cuda") -> dict[str, float]:
    """{row: host us a call} for a size x size AnybitLinear of ``width`` (``random_llama.mix_of``)."""
    gen = torch.Generator().manual_seed(0)
    lin = random_anybit_linear(size, size, mix_of(width), device, gen).to(device)
    x = torch.randn(1, 1, size, device=device, dtype=torch.float16)
    w = torch.randn(size, size, device=device, dtype=torch.float16)
    lin(x)  # tiles the codes (first GPU forward)
    ops = lin.kernel_operands(x.device)
    x2, y2 = x.view(1, size), torch.empty(1, size, device=device, dtype=torch.float16)
    blocks = [(b[0], b[1], int(b[2]), *b[3:]) for b in ops["blocks"]]
    planes = xplanes.x_planes(x2)
    bmma, x_planes = triton_bmma.BmmaLaunch(blocks, size, 1, device), xplanes.XPlanesLaunch(1, size, device)
    a = torch.empty(8, device=device)
    args25 = [a] * 12 + [1] * 13
    rows = {
        "F.linear (fp16)": lambda: torch.nn.functional.linear(x, w),
        "AnybitLinear forward": lambda: lin(x),
        "AnybitLinear forward, x planes given": lambda: lin(x, planes=planes),
        "AnybitLinear.uses_kernel": lambda: lin.uses_kernel(x),
        "AnybitLinear.kernel_operands (kept)": lambda: lin.kernel_operands(x.device),
        "torch.empty (the output)": lambda: torch.empty(1, 1, size, dtype=x.dtype, device=x.device),
        "kernels.lut_linear_blocks, x planes given": lambda: ak.lut_linear_blocks(x, ops["blocks"], size,
                                                                                  planes=planes),
        "triton_lut.launch_blocks, x planes given": lambda: triton_lut.launch_blocks(x2, blocks, size, y2,
                                                                                     planes=planes),
        "triton_bmma.launch, x planes given": lambda: triton_bmma.launch(x2, blocks, size, y2, planes=planes),
        "triton_bmma.BmmaLaunch made once, called, x planes given": lambda: bmma(x2, y2, planes),
        "xplanes.x_planes": lambda: xplanes.x_planes(x2),
        "xplanes.XPlanesLaunch made once, called": lambda: x_planes(x2),
        "empty Triton kernel, 1 argument": lambda: _empty_kernel[(1,)](a),
        "empty Triton kernel, 25 arguments": lambda: _empty_kernel_25[(1,)](*args25, C0=1, C1=2, C2=3),
        "empty Triton kernel, 25 arguments, compiled kernel run directly": _direct_launch(args25, (1, 2, 3)),
    }
    out = {}
    for name, fn in rows.items():
        out[name] = host_us(fn)
        print(f"{width:>5} bits  {name:<44} {out[name]:7.1f} us", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="3.25,3")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() and triton_bmma.available()):
        print("call_overhead.py: error: needs a CUDA GPU and Triton with Gluon", file=sys.stderr)
        return 2
    results = {w: measure(w) for w in args.widths.split(",")}
    os.makedirs(args.out, exist_ok=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "cpu": _cpu_name(), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(sys.argv), "host_us_a_call": results}
    with open(os.path.join(args.out, "call_overhead.json"), "w") as f:
        json.dump(info, f, indent=1)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
