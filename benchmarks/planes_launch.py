"""Time the x-plane launches (``anybit.kernels.xplanes``: SiLU-and-multiply, residual add + RMSNorm, plain
planes) of one row by row length and warps a program, the measurement behind ``xplanes.program_warps``;
and what a launch before a batch-1 linear costs it (``--before-linear``).

    cd benchmarks && python3 planes_launch.py --out $OUT                    # H100: ~1 min
    cd benchmarks && python3 planes_launch.py --before-linear --out $OUT    # H100: ~20 s

Each time is one call's share of a CUDA graph of 32 calls on 32 different rows (``kernels.bench_calls``);
every warp count's planes are checked equal to the first's. ``--before-linear`` times the binary
tensor-core linear (``triton_bmma.launch``, x's planes given) alone and behind each of: an empty
one-program kernel (the launch itself), a kernel of 32 programs that each load x's row and reduce it
(the planes launch's dependent loads, no planes), ``xplanes.x_planes``, and as ``launch`` runs it
(making its own planes); graphs of one call a matrix over ``kernels.n_buffers`` matrices, as
``kernel_speed.py`` times a call. Writes ``planes_launch.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

import triton
import triton.language as tl
from kernel_speed import bench_calls, block_bytes, kept_blocks, make_matrix, n_buffers  # (kernel_speed also puts src on the path)

from anybit.kernels import triton_bmma, xplanes

CALLS = 32
BEFORE_LINEAR_CASES = "28672x4096:3,11008x4096:3.25,4096x11008:3.25"


def time_launches(ks, warps, device="cuda"):
    """{"mode K=k warps=w": us a call} for every mode, K in ks and warps in warps."""
    results = {}
    saved = xplanes.program_warps
    try:
        for K in ks:
            g = [torch.randn(1, K, device=device, dtype=torch.float16) for _ in range(CALLS)]
            u = [torch.randn(1, K, device=device, dtype=torch.float16) for _ in range(CALLS)]
            w = torch.randn(K, device=device, dtype=torch.float16)
            calls = {"silu": lambda i: xplanes.silu_mul_planes(g[i], u[i])[-1],
                     "norm": lambda i: xplanes.add_rms_norm_planes(g[i], u[i], w, 1e-5)[-1],
                     "x": lambda i: xplanes.x_planes(g[i])}
            for name, call in calls.items():
                first = None
                for nw in warps:
                    xplanes.program_warps = lambda K, mode, nw=nw: nw
                    planes = call(0)
                    if first is None:
                        first = [p.clone() for p in planes]
                    if not all(torch.equal(a, b) for a, b in zip(first, planes)):
                        raise AssertionError(f"{name} K={K}: {nw} warps changed the planes")
                    us = 1e3 * bench_calls([lambda i=i: call(i) for i in range(CALLS)], device)
                    results[f"{name} K={K} warps={nw}"] = us
                    print(f"{name:>4} K={K:>5} warps={nw:>2}: {us:6.2f} us", flush=True)
    finally:
        xplanes.program_warps = saved
    return results


@triton.jit
def _empty_kernel(out_ptr):
    pass


@triton.jit
def _row_max_kernel(x_ptr, out_ptr, K, BLOCK_K: tl.constexpr):
    """Every program loads the row and reduces it: the x-plane launch's dependent loads without its planes."""
    offs = tl.arange(0, BLOCK_K)
    v = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
    tl.store(out_ptr + tl.program_id(0), tl.max(tl.abs(v), axis=0))


def time_before_linear(cases, device="cuda"):
    """{"shape width": {variant: us a call}} for cases [(out, in, width)]: the batch-1 linear with x's
    planes given alone and behind an empty launch, a load-and-reduce launch, ``x_planes``; and as a call."""
    gen = torch.Generator().manual_seed(0)
    results = {}
    for out_f, in_f, width in cases:
        first = make_matrix(out_f, in_f, width, device, torch.float16, gen)
        mats = [first] + [make_matrix(out_f, in_f, width, device, torch.float16, gen)
                          for _ in range(n_buffers(block_bytes(first, in_f, out_f, 0, 2), device) - 1)]
        kept = kept_blocks(mats, device)
        x = torch.randn(1, in_f, generator=gen).to(device, torch.float16)
        planes = xplanes.x_planes(x)
        y = torch.empty(1, out_f, dtype=torch.float16, device=device)
        sink = torch.empty(64, dtype=torch.float16, device=device)
        block_k = triton.next_power_of_2(in_f)

        def linear(m):
            triton_bmma.launch(x, m, in_f, y, planes=planes)

        before = {"alone": lambda: None, "empty launch": lambda: _empty_kernel[(1,)](sink),
                  "load-and-reduce launch": lambda: _row_max_kernel[(32,)](x, sink, in_f, BLOCK_K=block_k),
                  "x_planes": lambda: xplanes.x_planes(x)}
        row = {}
        for name, first_call in before.items():
            row[name] = 1e3 * bench_calls([lambda m=m, f=first_call: (f(), linear(m)) for m in kept], device)
        row["as a call"] = 1e3 * bench_calls([lambda m=m: triton_bmma.launch(x, m, in_f, y) for m in kept], device)
        key = f"{out_f}x{in_f} {width}"
        results[key] = row
        print(key + ": " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()) + " us", flush=True)
        del mats, kept
        torch.cuda.empty_cache()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="4096,5120,11008,14336")
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--before-linear", action="store_true",
                    help="time what a launch before a batch-1 linear costs it instead (--cases)")
    ap.add_argument("--cases", default=BEFORE_LINEAR_CASES, help="OUTxIN:WIDTH,... for --before-linear")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("planes_launch.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.before_linear:
        cases = []
        for case in args.cases.split(","):
            shape, _, width = case.partition(":")
            out_f, _, in_f = shape.partition("x")
            cases.append((int(out_f), int(in_f), width))
        results = time_before_linear(cases)
    else:
        results = time_launches([int(k) for k in args.ks.split(",")], [int(w) for w in args.warps.split(",")])
    os.makedirs(args.out, exist_ok=True)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
            "us_a_call": results}
    with open(os.path.join(args.out, "planes_launch.json"), "w") as f:
        json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
