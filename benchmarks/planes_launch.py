"""Time the x-plane launches (``anybit.kernels.xplanes``: SiLU-and-multiply, residual add + RMSNorm, plain
planes) of one row by row length and warps a program, the measurement behind ``xplanes.program_warps``.

    cd benchmarks && python3 planes_launch.py --out $OUT    # H100: ~1 min

Each time is one call's share of a CUDA graph of 32 calls on 32 different rows (``kernels.bench_calls``);
every warp count's planes are checked equal to the first's. Writes ``planes_launch.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from kernels import bench_calls  # (kernels also puts src on the path: the anybit package without transformers)

from anybit.kernels import xplanes

CALLS = 32


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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="4096,5120,11008,14336")
    ap.add_argument("--warps", default="4,8,16")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("planes_launch.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
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
