"""GPU speed of the linears without a codebook per row -- affine grids (rtn, gptq, slim) and codebooks
per column (cmpq, claq) -- through ``AnybitLinear``: their Triton kernels (``anybit.kernels.triton_grid``)
against the pure-torch path they ran before (decode the whole weight each call, one dense matmul;
``ANYBIT_KERNELS=reference``) and fp16 ``F.linear``.

    cd benchmarks && python3 grid_kernels.py --out $OUT              # H100: a few minutes
    python3 benchmarks/grid_kernels.py --smoke                       # CPU (no kernel there): the harness, seconds

Layouts: ``random_llama.LAYOUTS``' affine and per-column ones (random codes, scales, zeros and codebooks,
as the methods write them; values do not change the speed). Kernel and fp16 times: N calls over N weight copies (3x the 50 MB L2
in all) captured in one CUDA graph, replay timed with ``triton.testing.do_bench`` (median), a call's
share; the pure-torch path is not capturable (it synchronises) and is timed eagerly over the same
copies. Every kernel output is checked against the dense product first. ``--sweep`` times tile
configurations (``triton_grid.TILES``) as well. Writes ``grid_kernels.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

from anybit.fileio import write_json_atomic  # noqa: E402
from anybit.nn import AnybitLinear  # noqa: E402

from decode import kernels_env  # noqa: E402
from kernel_speed import bench_calls, rel_err  # noqa: E402  (after anybit: it would stand in a bare package)
from random_llama import LAYOUTS, random_weight  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
GRID_LAYOUTS = [name for name, (_, group, axis) in LAYOUTS.items() if group is not None or axis == 1]
L2_TIMES_3 = 150e6


def packed_bytes(module: AnybitLinear) -> int:
    return sum(t.numel() * t.element_size() for t in module.packed().values())


def graph_us(calls) -> float:
    """A call's share of one CUDA graph holding all ``calls`` (``kernel_speed.bench_calls``), in us."""
    return bench_calls(calls, "cuda") * 1e3


def eager_us(calls) -> float:
    def all_calls():
        for c in calls:
            c()

    if not torch.cuda.is_available():
        all_calls()
        start = time.perf_counter()
        all_calls()
        return (time.perf_counter() - start) / len(calls) * 1e6
    import triton

    return triton.testing.do_bench(all_calls, warmup=2, rep=60, return_mode="median") / len(calls) * 1e3


@torch.no_grad()
def case_rows(layout, out_f, in_f, batches, gen, device, smoke, sweep):
    q = random_weight(layout, out_f, in_f, gen)
    dense = q.dequantize(torch.float32).to(device, torch.float16)
    base = AnybitLinear.from_quantized(q).to(device)
    nbytes = packed_bytes(base)
    copies = 1 if smoke else int(min(48, max(3, -(-L2_TIMES_3 // nbytes))))
    modules = [base] + [copy.deepcopy(base) for _ in range(copies - 1)]
    dense_copies = [dense] + [dense.clone() for _ in range(0 if smoke else int(max(3, -(-L2_TIMES_3 // (2 * dense.numel()))) - 1))]
    from anybit.kernels import triton_grid

    mode = triton_grid.COLUMNS if layout.startswith("cols") else triton_grid.AFFINE
    rows = []
    for batch in batches:
        dot = batch > triton_grid.ROW_KERNEL_MAX_ROWS[mode]
        key = (mode, dot)
        configs = [None] + ([c for c in sweep[dot] if c != triton_grid.TILES[key]] if sweep else [])
        x = torch.randn(batch, in_f, generator=gen).to(device, torch.float16)
        want = x.double() @ dense.double().t()
        row = {"shape": f"{out_f}x{in_f}", "layout": layout, "batch": batch, "packed_MB": round(nbytes / 1e6, 2),
               "copies": copies}
        for config in configs:
            default = triton_grid.TILES[key]
            if config is not None:
                triton_grid.TILES[key] = config
            try:
                err = rel_err(base(x), want)
                us = eager_us([lambda m=m: m(x) for m in modules]) if device == "cpu" else \
                    graph_us([lambda m=m: m(x) for m in modules])
            finally:
                triton_grid.TILES[key] = default
            label = "kernel" if config is None else "kernel " + ",".join(map(str, config))
            row[f"{label} us"] = round(us, 2)
            row[f"{label} rel_err"] = float(f"{err:.2e}")
        with kernels_env("reference"):
            row["torch path us"] = round(eager_us([lambda m=m: m(x) for m in modules]), 1)
        fp16 = (eager_us if device == "cpu" else graph_us)([lambda w=w: F.linear(x, w) for w in dense_copies])
        row["fp16 F.linear us"] = round(fp16, 2)
        row["kernel x fp16"] = round(fp16 / row["kernel us"], 2)
        row["kernel x torch path"] = round(row["torch path us"] / row["kernel us"], 1)
        row["kernel GB/s"] = round(nbytes / (row["kernel us"] * 1e-6) / 1e9)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one small shape, no timing worth reading (CPU harness check)")
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    ap.add_argument("--layouts", default=",".join(GRID_LAYOUTS))
    ap.add_argument("--batches", default="1,2,4,16")
    ap.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ["ANYBIT_GRID_KERNELS"] = "1"  # on request until a GPU has checked them (kernels.grid_kernels_on)
    shapes = [(64, 96)] if args.smoke else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    sweep = None
    if args.sweep:
        # (BLOCK_N, columns a step, warps, stages) of triton_grid.TILES: the row kernel, then the dot kernel
        sweep = {False: list(itertools.product((128, 256, 512), (32, 64, 128), (4, 8), (2, 3))),
                 True: list(itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3)))}
    gen = torch.Generator().manual_seed(0)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": (torch.cuda.get_device_name() if device == "cuda" else platform.machine())
                   + f", torch {torch.__version__}",
        "command": "python3 grid_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": [],
    }
    for layout, (out_f, in_f) in itertools.product(args.layouts.split(","), shapes):
        result["rows"] += case_rows(layout, out_f, in_f, batches, gen, device, args.smoke, sweep)
    bad = [r for r in result["rows"] if not all(v < 1e-2 for k, v in r.items() if k.endswith("rel_err"))]
    result["failures"] = len(bad)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "grid_kernels.json"), result)
    lines = [f"{result['machine']}, {result['date']}: `{result['command']}`", "",
             "| shape | layout | batch | packed MB | kernel us | pure-torch path us | fp16 F.linear us | kernel x fp16 | "
             "kernel x torch path | kernel GB/s | rel. error |", "|" + " --- |" * 11]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['layout']} | {r['batch']} | {r['packed_MB']} | {r['kernel us']} | "
                     f"{r['torch path us']} | {r['fp16 F.linear us']} | {r['kernel x fp16']} | {r['kernel x torch path']} | "
                     f"{r['kernel GB/s']} | {r['kernel rel_err']} |")
    print("\n".join(lines))
    print(f"{len(result['rows'])} rows, {len(bad)} with a relative error over 1e-2")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
